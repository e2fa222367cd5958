// Attention reweighting, CUDA kernels: thin __global__ launchers around attention_reweight_math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "attention_reweight/attention_reweight.h"
#include "common/cuda_utils.cuh"
#include "common/memory_format.h"

namespace epamx {
namespace {

// Threads wanted in flight for the backward pass's first step: channels are split into groups until the
// positions times the groups reach this (EPAM-Net's 12 x 16 x 7 x 7 positions alone would leave a GPU idle).
constexpr int64_t kTargetThreads = 1 << 17;

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void reweight_forward_kernel(ReweightGeometry<index_t> g, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ s, const scalar_t* __restrict__ a,
                                        scalar_t* __restrict__ out, index_t numel) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, numel) { reweight_forward_thread<scalar_t, acc_t, index_t>(i, g, x, s, a, out); }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void reweight_backward_kernel(ReweightGeometry<index_t> g, index_t groups, const scalar_t* __restrict__ grad,
                                         const scalar_t* __restrict__ x, const scalar_t* __restrict__ s,
                                         const scalar_t* __restrict__ a, scalar_t* __restrict__ dx,
                                         acc_t* __restrict__ partial, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, threads) {
    reweight_backward_thread<scalar_t, acc_t, index_t>(i, groups, g, grad, x, s, a, dx, partial);
  }
}

// The sum of v over the block's kBlockThreads threads, in thread 0 (the others get partial sums). Every thread must
// call it, in a block of exactly kBlockThreads threads (full warps: the shuffles name all 32 lanes; at most 32 warps:
// one warp sums the warps' sums); warp_sums holds one value per warp and may be reused after the next
// __syncthreads().
constexpr int kWarp = 32;

template <int kBlockThreads, typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* warp_sums) {
  static_assert(kBlockThreads % kWarp == 0 && kBlockThreads / kWarp <= kWarp,
                "block_sum needs whole warps, at most 32 of them");
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlockThreads / kWarp ? warp_sums[lane] : acc_t(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// One block per frame (grid-stride over frames): the block's threads share the frame's H*W positions, each writing
// dS and adding its terms of dA, which a block reduction then sums. Launched with exactly kBlockThreads threads
// (block_sum's requirement; __launch_bounds__ makes a larger launch fail, the assert a smaller one).
constexpr int kFinishThreads = cuda::kThreadsPerBlock;

template <int kBlockThreads, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    reweight_backward_finish_kernel(ReweightGeometry<index_t> g, index_t groups, const acc_t* __restrict__ partial,
                                    const scalar_t* __restrict__ s, const scalar_t* __restrict__ a,
                                    scalar_t* __restrict__ ds, scalar_t* __restrict__ da) {
  CUDA_KERNEL_ASSERT(blockDim.x == kBlockThreads && blockDim.y == 1 && blockDim.z == 1);
  __shared__ acc_t warp_sums[kBlockThreads / kWarp];
  const index_t positions = g.N * g.T * g.P;
  const int64_t frames = static_cast<int64_t>(g.N) * g.T;
  for (int64_t f = blockIdx.x; f < frames; f += gridDim.x) {
    const auto frame = static_cast<index_t>(f);
    const acc_t av = static_cast<acc_t>(a[frame]);
    acc_t total = 0;
    for (index_t p = static_cast<index_t>(threadIdx.x); p < g.P; p += static_cast<index_t>(kBlockThreads)) {
      total += reweight_backward_finish_position<scalar_t, acc_t, index_t>(frame, p, groups, positions, g,
                                                                           partial + frame * g.P, s, av, ds);
    }
    total = block_sum<kBlockThreads>(total, warp_sums);
    if (threadIdx.x == 0) da[frame] = static_cast<scalar_t>(total);
    __syncthreads();  // warp_sums is reused for the next frame
  }
}

at::Tensor attention_reweight_cuda(const at::Tensor& x_in, const at::Tensor& spatial_in,
                                   const at::Tensor& temporal_in) {
  constexpr const char* op = "attention_reweight";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat format = x_in.suggest_memory_format();  // the result's, as on the CPU
  const at::Tensor x = x_in.contiguous(), s = spatial_in.contiguous(), a = temporal_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return in_memory_format(out, format);
  check_int32_indexing(x, op, "x");
  const auto g = reweight_geometry<int32_t>(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto numel = static_cast<int32_t>(x.numel());
    reweight_forward_kernel<scalar_t, acc_t, int32_t><<<cuda::blocks_for(numel), cuda::kThreadsPerBlock, 0, stream>>>(
        g, x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in_memory_format(out, format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_reweight_backward_cuda(const at::Tensor& grad_in,
                                                                                const at::Tensor& x_in,
                                                                                const at::Tensor& spatial_in,
                                                                                const at::Tensor& temporal_in) {
  constexpr const char* op = "_attention_reweight_backward";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  check_reweight_grad(grad_in, x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat format = x_in.suggest_memory_format();  // the result's, as on the CPU
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), s = spatial_in.contiguous(),
                   a = temporal_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor ds = at::empty(s.sizes(), s.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  // Sums over no channels or no pixels are zero (dA is not empty when only H*W is).
  if (x.numel() == 0) return {in_memory_format(dx, format), ds.zero_(), da.zero_()};
  const int64_t positions = x.size(0) * x.size(2) * x.size(3) * x.size(4);
  const int64_t groups = std::clamp<int64_t>((kTargetThreads + positions - 1) / positions, 1, x.size(1));
  check_int32_indexing(x, op, "x");  // groups * positions <= C * positions = x.numel()
  const auto g = reweight_geometry<int32_t>(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({groups * positions}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const auto threads = static_cast<int32_t>(groups * positions);
    reweight_backward_kernel<scalar_t, acc_t, int32_t>
        <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
            g, static_cast<int32_t>(groups), grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            s.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
            partial.mutable_data_ptr<acc_t>(), threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reweight_backward_finish_kernel<kFinishThreads, scalar_t, acc_t, int32_t>
        <<<cuda::blocks_for(int64_t(g.N) * g.T, 1), kFinishThreads, 0, stream>>>(
            g, static_cast<int32_t>(groups), partial.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(),
            a.const_data_ptr<scalar_t>(), ds.mutable_data_ptr<scalar_t>(), da.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in_memory_format(dx, format), ds, da};
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) {
  m.impl("attention_reweight", &attention_reweight_cuda);
  m.impl("_attention_reweight_backward", &attention_reweight_backward_cuda);
}

}  // namespace epamx
