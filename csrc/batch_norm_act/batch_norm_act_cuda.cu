// Batch norm + activation, CUDA kernels: one thread per element (elementwise), one thread per (n, c) row
// (reductions; in channels-last memory neighbouring threads read neighbouring channels, so the loads coalesce).
// The reductions are plain per-thread loops rather than block reductions: simple, deterministic, and the math
// the CPU tests run; a tree reduction would be the next step if they show up in a GPU profile.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "batch_norm_act/batch_norm_act.h"
#include "common/cuda_utils.cuh"

namespace epamx {
namespace {

template <typename scalar_t, typename index_t>
__global__ void moments_kernel(AffineGeometry<index_t> g, const scalar_t* __restrict__ x, double* sum,
                               double* sumsq, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) { moments_thread<scalar_t, index_t>(i, g, x, sum, sumsq); }
}

template <Activation act, typename scalar_t, typename acc_t, typename index_t>
__global__ void affine_act_kernel(AffineGeometry<index_t> g, const scalar_t* __restrict__ x,
                                  const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                  scalar_t* __restrict__ out, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) { affine_act_thread<act, scalar_t, acc_t, index_t>(i, g, x, scale, shift, out); }
}

template <Activation act, typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_reduce_kernel(AffineGeometry<index_t> g, const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift, double* sum_u, double* sum_ux,
                                       index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) {
    backward_reduce_thread<act, scalar_t, acc_t, index_t>(i, g, grad, x, scale, shift, sum_u, sum_ux);
  }
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

std::tuple<at::Tensor, at::Tensor> channel_moments_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "_channel_moments";
  check_affine_input(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = affine_input(x_in);
  const auto g = affine_geometry<int32_t>(x, affine_channels_last(x));
  at::Tensor sum = at::zeros({x.size(0), x.size(1)}, x.options().dtype(at::kDouble));
  at::Tensor sumsq = at::zeros_like(sum);
  if (x.numel() == 0) return {sum, sumsq};
  check_int32_indexing(x, op, "x");
  const int32_t threads = g.N * g.C;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    moments_kernel<scalar_t, int32_t><<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
        g, x.const_data_ptr<scalar_t>(), sum.mutable_data_ptr<double>(), sumsq.mutable_data_ptr<double>(), threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  check_int32_indexing(x, op, "x");
  const auto g = affine_geometry<int32_t>(x, in.channels_last);
  const int32_t threads = static_cast<int32_t>(x.numel());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&]<Activation A>() {
      affine_act_kernel<A, scalar_t, acc_t, int32_t><<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
          g, x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), threads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  at::Tensor sum_u = at::zeros({x.size(0), x.size(1)}, x.options().dtype(at::kDouble));
  at::Tensor sum_ux = at::zeros_like(sum_u);
  if (x.numel() == 0) return {sum_u, sum_ux};
  check_int32_indexing(x, op, "x");
  const auto g = affine_geometry<int32_t>(x, in.channels_last);
  const int32_t threads = g.N * g.C;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&]<Activation A>() {
      backward_reduce_kernel<A, scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
              g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
              shift.const_data_ptr<acc_t>(), sum_u.mutable_data_ptr<double>(), sum_ux.mutable_data_ptr<double>(),
              threads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  check_int32_indexing(x, op, "x");
  const auto g = affine_geometry<int32_t>(x, in.channels_last);
  const int32_t threads = static_cast<int32_t>(x.numel());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&]<Activation A>() {
      backward_kernel<A, scalar_t, acc_t, int32_t><<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
          g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(), cu.const_data_ptr<acc_t>(), cx.const_data_ptr<acc_t>(),
          c1.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), threads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
