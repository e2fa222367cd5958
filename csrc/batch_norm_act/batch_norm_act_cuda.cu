// Batch norm + activation, CUDA kernels. Offsets are int32 where x (and grad) fit them, else int64.
//
// affine_act and _affine_act_backward: one thread per element in memory order, grid-stride, cuda::kThreadsPerBlock
// threads a block; each reads its (n, c) row's coefficients (in channels-last memory neighbouring threads read
// neighbouring channels').
//
// _channel_moments and _affine_act_backward_reduce: the two-pass row reduction batch_norm_act_math.h describes
// (RowReducePlan; the split is row_reduce_plan's, batch_norm_act.h). row_reduce_kernel runs either pass: blocks of
// exactly kRowReduceThreads = 256 threads (__launch_bounds__; checked in the kernel), grid-stride over the pass's
// tiles * splits blocks (at most cuda::kMaxBlocks launched), 4 KiB of shared memory (two doubles a thread) for the
// lane tree, whose levels are separated by __syncthreads() (every thread of a block runs the same levels). For
// EPAM-Net's first RGB stage, x (4, 54, 16, 56, 56):
//   contiguous:        216 rows of 50176, a tile per row (256 lanes), 10 slices of 20 steps: 2160 blocks; pass 2:
//                      9 blocks (25 rows of 10 lanes: 10 partial sums a row);
//   channels_last_3d:  4 tiles (a sample's 54 channels x 4 lanes, 216 threads), 502 slices of 25 steps: 2008 blocks;
//                      pass 2: 216 blocks (a row of 256 lanes, 2 steps: 502 partial sums a row).
// Pass 2 adds each row's partial sums in a fixed order, as pass 1 adds a slice's: no atomics, the same results on
// every run.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "batch_norm_act/batch_norm_act.h"
#include "common/cuda_utils.cuh"

namespace epamx {
namespace {

template <Activation act, typename scalar_t, typename acc_t, typename index_t>
__global__ void affine_act_kernel(AffineGeometry<index_t> g, const scalar_t* __restrict__ x,
                                  const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                  scalar_t* __restrict__ out, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) { affine_act_thread<act, scalar_t, acc_t, index_t>(i, g, x, scale, shift, out); }
}

template <Activation act, typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_kernel(AffineGeometry<index_t> g, const scalar_t* __restrict__ grad,
                                const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                                const acc_t* __restrict__ shift, const acc_t* __restrict__ coef_u,
                                const acc_t* __restrict__ coef_x, const acc_t* __restrict__ coef_1,
                                scalar_t* __restrict__ dx, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) {
    backward_thread<act, scalar_t, acc_t, index_t>(i, g, grad, x, scale, shift, coef_u, coef_x, coef_1, dx);
  }
}

// One pass of the row reduction: block b of p.tiles * p.splits writes sum1/sum2[row * p.splits + b % p.splits] for
// each row of its tile. Launched with exactly kRowReduceThreads threads a block.
template <typename Terms, typename index_t>
__global__ void __launch_bounds__(kRowReduceThreads)
    row_reduce_kernel(AffineGeometry<index_t> g, RowReducePlan<index_t> p, Terms terms, double* __restrict__ sum1,
                      double* __restrict__ sum2) {
  CUDA_KERNEL_ASSERT(blockDim.x == kRowReduceThreads && blockDim.y == 1 && blockDim.z == 1);
  __shared__ double lane_sum1[kRowReduceThreads], lane_sum2[kRowReduceThreads];
  const auto t = static_cast<index_t>(threadIdx.x);
  const int64_t blocks = static_cast<int64_t>(p.tiles) * p.splits;
  const index_t top = row_reduce_tree_top(p.lanes);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    index_t lane;
    double s1, s2;
    const index_t row = row_reduce_thread(static_cast<index_t>(b), t, g, p, terms, s1, s2, &lane);
    lane_sum1[t] = s1;
    lane_sum2[t] = s2;
    // Level `half`: lane l < half of a row adds lane l + half's sum (written before the barrier; lanes >= half write
    // nothing at this level, so no slot is read and written at once).
    for (index_t half = top; half > 0; half /= 2) {
      __syncthreads();
      if (row >= 0 && lane < half && lane + half < p.lanes) {
        lane_sum1[t] += lane_sum1[t + half * p.lane_stride];
        lane_sum2[t] += lane_sum2[t + half * p.lane_stride];
      }
    }
    if (row >= 0 && lane == 0) {  // lane 0 wrote its slot last itself
      const index_t slot = row * p.splits + static_cast<index_t>(b % p.splits);
      sum1[slot] = lane_sum1[t];
      sum2[slot] = lane_sum2[t];
    }
    __syncthreads();  // every slot is rewritten for the next block
  }
}

template <typename Terms, typename index_t>
void launch_row_reduce_pass(const AffineGeometry<index_t>& g, const RowReducePlan<index_t>& p, const Terms& terms,
                            double* sum1, double* sum2, cudaStream_t stream) {
  const unsigned int blocks = cuda::blocks_for(static_cast<int64_t>(p.tiles) * p.splits, 1);
  row_reduce_kernel<Terms, index_t><<<blocks, kRowReduceThreads, 0, stream>>>(g, p, terms, sum1, sum2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The (N, C) row sums of `terms` over x's geometry g into sum1 and sum2 (every element written).
template <typename Terms, typename index_t>
void row_reduce(const AffineGeometry<index_t>& g, const Terms& terms, at::Tensor& sum1, at::Tensor& sum2,
                cudaStream_t stream) {
  const RowReducePlan<index_t> plan = row_reduce_plan(g, true);
  if (plan.splits == 1) {  // one slice per row: pass 1 writes the results
    launch_row_reduce_pass(g, plan, terms, sum1.mutable_data_ptr<double>(), sum2.mutable_data_ptr<double>(), stream);
    return;
  }
  const int64_t rows = static_cast<int64_t>(g.N) * g.C;
  // (2, N * C, splits): pass 1's partial sums, row-major; freed on return, after pass 2 on this stream.
  at::Tensor partial = at::empty({2, rows, static_cast<int64_t>(plan.splits)}, sum1.options());
  double* part1 = partial.mutable_data_ptr<double>();
  double* part2 = part1 + rows * plan.splits;
  launch_row_reduce_pass(g, plan, terms, part1, part2, stream);
  const AffineGeometry<index_t> rows_g{index_t(1), static_cast<index_t>(rows), plan.splits, false};
  launch_row_reduce_pass(rows_g, row_reduce_plan(rows_g, false), PartialTerms{part1, part2},
                         sum1.mutable_data_ptr<double>(), sum2.mutable_data_ptr<double>(), stream);
}

// The (N, C) float64 row sums the reductions return: zeros for an empty x, else uninitialised (all written).
std::tuple<at::Tensor, at::Tensor> row_sum_outputs(const at::Tensor& x) {
  const auto options = x.options().dtype(at::kDouble);
  if (x.numel() == 0) return {at::zeros({x.size(0), x.size(1)}, options), at::zeros({x.size(0), x.size(1)}, options)};
  return {at::empty({x.size(0), x.size(1)}, options), at::empty({x.size(0), x.size(1)}, options)};
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "_channel_moments";
  check_affine_input(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const AffineOperands in = affine_operands(x_in, nullptr, {}, {});
  const at::Tensor& x = in.x;
  auto [sum, sumsq] = row_sum_outputs(x);
  if (x.numel() == 0) return {sum, sumsq};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    dispatch_index_type({&x}, [&]<typename index_t>() {
      row_reduce(affine_geometry<index_t>(x, in.channels_last), MomentTerms<scalar_t>{x.const_data_ptr<scalar_t>()},
                 sum, sumsq, stream);
    });
  });
  return {sum, sumsq};
}

at::Tensor affine_act_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                           int64_t act) {
  constexpr const char* op = "affine_act";
  check_affine_args(x_in, nullptr, scale_in, shift_in, op);
  check_activation(act, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const AffineOperands in = affine_operands(x_in, nullptr, scale_in, shift_in);
  const at::Tensor &x = in.x, &scale = in.scale, &shift = in.shift;
  at::Tensor out = at::empty(x.sizes(), in.output_options());
  if (x.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&]<Activation A>() {
      dispatch_index_type({&x}, [&]<typename index_t>() {
        const auto g = affine_geometry<index_t>(x, in.channels_last);
        const auto threads = static_cast<index_t>(x.numel());
        affine_act_kernel<A, scalar_t, acc_t, index_t><<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
            g, x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
            out.mutable_data_ptr<scalar_t>(), threads);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_act_backward_reduce_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const at::Tensor& scale_in,
                                                                   const at::Tensor& shift_in, int64_t act) {
  constexpr const char* op = "_affine_act_backward_reduce";
  check_affine_args(x_in, &grad_in, scale_in, shift_in, op);
  check_activation(act, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const AffineOperands in = affine_operands(x_in, &grad_in, scale_in, shift_in);
  const at::Tensor &x = in.x, &grad = in.grad, &scale = in.scale, &shift = in.shift;
  auto [sum_u, sum_ux] = row_sum_outputs(x);
  if (x.numel() == 0) return {sum_u, sum_ux};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&]<Activation A>() {
      dispatch_index_type({&x, &grad}, [&]<typename index_t>() {
        const ActGradTerms<A, scalar_t, acc_t> terms{grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                     scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()};
        row_reduce(affine_geometry<index_t>(x, in.channels_last), terms, sum_u, sum_ux, stream);
      });
    });
  });
  return {sum_u, sum_ux};
}

at::Tensor affine_act_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale_in,
                                    const at::Tensor& shift_in, const at::Tensor& coef_u_in,
                                    const at::Tensor& coef_x_in, const at::Tensor& coef_1_in, int64_t act) {
  constexpr const char* op = "_affine_act_backward";
  check_affine_args(x_in, &grad_in, scale_in, shift_in, op);
  check_coefficient(coef_u_in, x_in, op, "coef_u");
  check_coefficient(coef_x_in, x_in, op, "coef_x");
  check_coefficient(coef_1_in, x_in, op, "coef_1");
  check_activation(act, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const AffineOperands in = affine_operands(x_in, &grad_in, scale_in, shift_in);
  const at::Tensor &x = in.x, &grad = in.grad, &scale = in.scale, &shift = in.shift;
  const at::Tensor cu = coef_u_in.contiguous(), cx = coef_x_in.contiguous(), c1 = coef_1_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), in.output_options());
  if (x.numel() == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&]<Activation A>() {
      dispatch_index_type({&x, &grad}, [&]<typename index_t>() {
        const auto g = affine_geometry<index_t>(x, in.channels_last);
        const auto threads = static_cast<index_t>(x.numel());
        backward_kernel<A, scalar_t, acc_t, index_t><<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
            g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
            shift.const_data_ptr<acc_t>(), cu.const_data_ptr<acc_t>(), cx.const_data_ptr<acc_t>(),
            c1.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), threads);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) {
  m.impl("_channel_moments", &channel_moments_cuda);
  m.impl("affine_act", &affine_act_cuda);
  m.impl("_affine_act_backward_reduce", &affine_act_backward_reduce_cuda);
  m.impl("_affine_act_backward", &affine_act_backward_cuda);
}

}  // namespace epamx
