// Channel pooling, CUDA kernels. x is read, and the pooled tensor and dx written, in x's memory format (NCTHW or
// NTHWC, as x.suggest_memory_format() names it, as on the CPU):
//   NCTHW: one thread per output position (forward) or input position (backward), looping over the channels
//     (neighbouring threads read neighbouring positions of a channel, so the loads coalesce), grid-stride,
//     cuda::kThreadsPerBlock threads a block;
//   NTHWC: a position's channels are contiguous, so each position gets a team of team_width(C) lanes (common/
//     teams.h; blocks of cuda::kTeamThreads = 256 threads), lane l reading channels l, l + width, ... The team's
//     butterfly of shuffles combines the lanes' maxima and sums (forward) or arg-maxima (backward, after which every
//     lane writes dx for its channels). EPAM-Net's pose features (12, 216, 48, 7, 7), t_stride 3: forward, 9408
//     output positions of 32 lanes (6 or 7 channels each), 1176 blocks; backward, 28224 input positions, 3528
//     blocks.
// The channel sums are taken in an order fixed by C (the same results every run), the maxima exactly.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "channel_pool/channel_pool.h"
#include "common/cuda_utils.cuh"
#include "common/teams.h"

namespace epamx {
namespace {

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void channel_pool_forward_kernel(PoolGeometry<index_t> g, const scalar_t* __restrict__ x,
                                            scalar_t* __restrict__ out, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) { channel_pool_forward_thread<scalar_t, acc_t, index_t>(i, g, x, out); }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void channel_pool_backward_kernel(PoolGeometry<index_t> g, const scalar_t* __restrict__ grad,
                                             const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                             index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) {
    channel_pool_backward_thread<scalar_t, acc_t, index_t>(i, g, grad, x, dx);
  }
}

// NTHWC forward: a team of `width` lanes per output position (EPAMX_TEAM_LOOP); lane 0 writes the position's max and
// mean. Launched with exactly cuda::kTeamThreads threads a block (whole warps: the shuffles name all 32 lanes).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(cuda::kTeamThreads)
    channel_pool_forward_cl_kernel(PoolGeometry<index_t> g, int width, const scalar_t* __restrict__ x,
                                   scalar_t* __restrict__ out) {
  CUDA_KERNEL_ASSERT(blockDim.x == cuda::kTeamThreads && blockDim.y == 1 && blockDim.z == 1);
  const int64_t positions = static_cast<int64_t>(g.N) * g.T_out * g.P;
  EPAMX_TEAM_LOOP(position, lane, positions, width) {
    const bool active = position < positions;  // else a padding lane: it shuffles, and touches no memory
    acc_t best = -std::numeric_limits<acc_t>::infinity(), sum = 0;
    if (active) {
      channel_pool_forward_lane_cl<scalar_t, acc_t, index_t>(static_cast<index_t>(position),
                                                             static_cast<index_t>(lane), static_cast<index_t>(width),
                                                             g, x, best, sum);
    }
    for (int offset = width / 2; offset > 0; offset /= 2) {
      best = pool_max_step(best, __shfl_xor_sync(0xffffffffu, best, offset));
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (active && lane == 0) {
      channel_pool_forward_write_cl<scalar_t, acc_t, index_t>(static_cast<index_t>(position), g, best, sum, out);
    }
  }
}

// NTHWC backward: a team of `width` lanes per input position; the butterfly leaves every lane with the position's
// arg-max, and each lane writes dx for its channels. Launched as channel_pool_forward_cl_kernel.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(cuda::kTeamThreads)
    channel_pool_backward_cl_kernel(PoolGeometry<index_t> g, int width, const scalar_t* __restrict__ grad,
                                    const scalar_t* __restrict__ x, scalar_t* __restrict__ dx) {
  CUDA_KERNEL_ASSERT(blockDim.x == cuda::kTeamThreads && blockDim.y == 1 && blockDim.z == 1);
  const int64_t positions = static_cast<int64_t>(g.N) * g.T * g.P;
  EPAMX_TEAM_LOOP(position, lane, positions, width) {
    const bool active = position < positions;  // else a padding lane: it shuffles, and touches no memory
    PoolArgMax<acc_t, index_t> best{-std::numeric_limits<acc_t>::infinity(), g.C};
    if (active) {
      best = channel_pool_backward_lane_cl<scalar_t, acc_t, index_t>(
          static_cast<index_t>(position), static_cast<index_t>(lane), static_cast<index_t>(width), g, x);
    }
    for (int offset = width / 2; offset > 0; offset /= 2) {
      const PoolArgMax<acc_t, index_t> other{__shfl_xor_sync(0xffffffffu, best.value, offset),
                                             __shfl_xor_sync(0xffffffffu, best.arg, offset)};
      best = pool_arg_max_combine(best, other);
    }
    if (active) {
      channel_pool_backward_write_cl<scalar_t, acc_t, index_t>(static_cast<index_t>(position),
                                                               static_cast<index_t>(lane),
                                                               static_cast<index_t>(width), best.arg, g, grad, dx);
    }
  }
}

at::Tensor channel_pool_cuda(const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "channel_pool";
  check_pool_args(x_in, t_stride, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // x is read and the output written in x's memory format, NCTHW or NTHWC; other strides are copied into the format
  // x suggests (as on the CPU).
  const at::MemoryFormat format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format);
  at::Tensor out = at::empty(pool_output_shape(x, t_stride), x.options().memory_format(format));
  if (out.numel() == 0) return out;
  // The kernels index both with int32, and out (N, 2, T', H, W) is the larger of the two when C = 1.
  check_int32_indexing(x, op, "x");
  check_int32_indexing(out, op, "the output");
  const auto g = pool_geometry<int32_t>(x, t_stride);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (format == at::MemoryFormat::ChannelsLast3d) {
      const int width = team_width(g.C);
      const int64_t positions = static_cast<int64_t>(g.N) * g.T_out * g.P;
      channel_pool_forward_cl_kernel<scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(cuda::team_threads(positions, width), cuda::kTeamThreads), cuda::kTeamThreads, 0,
             stream>>>(g, width, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    } else {
      const int32_t threads = g.N * g.T_out * g.P;
      channel_pool_forward_kernel<scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
              g, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), threads);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor channel_pool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "_channel_pool_backward";
  check_pool_args(x_in, t_stride, op);
  check_pool_grad(grad_in, x_in, t_stride, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat format = x_in.suggest_memory_format();  // grad is read and dx written in x's format
  const at::Tensor grad = grad_in.contiguous(format), x = x_in.contiguous(format);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return dx;
  // grad (N, 2, T', H, W) is larger than x and dx when C = 1; the kernels index all three with int32.
  check_int32_indexing(x, op, "x");
  check_int32_indexing(grad, op, "grad");
  const auto g = pool_geometry<int32_t>(x, t_stride);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (format == at::MemoryFormat::ChannelsLast3d) {
      const int width = team_width(g.C);
      const int64_t positions = static_cast<int64_t>(g.N) * g.T * g.P;
      channel_pool_backward_cl_kernel<scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(cuda::team_threads(positions, width), cuda::kTeamThreads), cuda::kTeamThreads, 0,
             stream>>>(g, width, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       dx.mutable_data_ptr<scalar_t>());
    } else {
      const int32_t threads = g.N * g.T * g.P;
      channel_pool_backward_kernel<scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
              g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
              threads);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) {
  m.impl("channel_pool", &channel_pool_cuda);
  m.impl("_channel_pool_backward", &channel_pool_backward_cuda);
}

}  // namespace epamx
