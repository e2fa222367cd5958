// Channel pooling, CUDA kernels: one thread per output position (forward) or input position (backward).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "channel_pool/channel_pool.h"
#include "common/cuda_utils.cuh"
#include "common/memory_format.h"

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

at::Tensor channel_pool_cuda(const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "channel_pool";
  check_pool_args(x_in, t_stride, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat format = x_in.suggest_memory_format();  // the result's, as on the CPU
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(pool_output_shape(x, t_stride), x.options());
  if (out.numel() == 0) return in_memory_format(out, format);
  // The kernel indexes both with int32, and out (N, 2, T', H, W) is the larger of the two when C = 1.
  check_int32_indexing(x, op, "x");
  check_int32_indexing(out, op, "the output");
  const auto g = pool_geometry<int32_t>(x, t_stride);
  const int32_t threads = g.N * g.T_out * g.P;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_pool_forward_kernel<scalar_t, acc_t, int32_t>
        <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(g, x.const_data_ptr<scalar_t>(),
                                                                           out.mutable_data_ptr<scalar_t>(), threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in_memory_format(out, format);
}

at::Tensor channel_pool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "_channel_pool_backward";
  check_pool_args(x_in, t_stride, op);
  check_pool_grad(grad_in, x_in, t_stride, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat format = x_in.suggest_memory_format();  // the result's, as on the CPU
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return in_memory_format(dx, format);
  // grad (N, 2, T', H, W) is larger than x and dx when C = 1; the kernel indexes all three with int32.
  check_int32_indexing(x, op, "x");
  check_int32_indexing(grad, op, "grad");
  const auto g = pool_geometry<int32_t>(x, t_stride);
  const int32_t threads = g.N * g.T * g.P;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_pool_backward_kernel<scalar_t, acc_t, int32_t>
        <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
            g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
            threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in_memory_format(dx, format);
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) {
  m.impl("channel_pool", &channel_pool_cuda);
  m.impl("_channel_pool_backward", &channel_pool_backward_cuda);
}

}  // namespace epamx
