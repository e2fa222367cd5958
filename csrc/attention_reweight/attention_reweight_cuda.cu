// Attention reweighting, CUDA kernels: thin __global__ launchers around attention_reweight_math.h. x is read, and out
// and dx written, in x's memory format (NCTHW or NTHWC, as x.suggest_memory_format() names it, as on the CPU):
//   forward: one thread per element in memory order, grid-stride, cuda::kThreadsPerBlock threads a block;
//   backward, NCTHW: per channel group and position a thread (reweight_backward_kernel), then a block per frame
//     (reweight_backward_finish_kernel, kFinishThreads = 256 threads, a block_sum for dA);
//   backward, NTHWC: per position a team of team_width(C) lanes (reweight_backward_cl_kernel: blocks of
//     cuda::kTeamThreads = 256, 8 positions of 32 lanes at C >= 32), whose butterfly of shuffles adds the
//     position's sum of g*x, then the same per-frame blocks with one group. EPAM-Net, x (12, 432, 16, 7, 7): 9408
//     positions of 32 lanes, 13 or 14 channels each: 1176 blocks.
// No atomics: every sum is taken in an order fixed by the shape.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "attention_reweight/attention_reweight.h"
#include "common/cuda_utils.cuh"
#include "common/teams.h"

namespace epamx {
namespace {

// Threads wanted in flight for the backward pass's first step: channels are split into groups until the
// positions times the groups reach this (EPAM-Net's 12 x 16 x 7 x 7 positions alone would leave a GPU idle).
constexpr int64_t kTargetThreads = 1 << 17;

template <bool channels_last, typename scalar_t, typename acc_t, typename index_t>
__global__ void reweight_forward_kernel(ReweightGeometry<index_t> g, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ s, const scalar_t* __restrict__ a,
                                        scalar_t* __restrict__ out, index_t numel) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, numel) {
    if constexpr (channels_last) {
      reweight_forward_thread_cl<scalar_t, acc_t, index_t>(i, g, x, s, a, out);
    } else {
      reweight_forward_thread<scalar_t, acc_t, index_t>(i, g, x, s, a, out);
    }
  }
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

// Backward, first step in NTHWC memory: a team of `width` lanes per position (EPAMX_TEAM_LOOP), each lane writing
// dx for its channels; the team's butterfly adds the lanes' sums of g*x, and lane 0 writes partial[position].
// Launched with exactly cuda::kTeamThreads threads a block (whole warps: the shuffles name all 32 lanes).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(cuda::kTeamThreads)
    reweight_backward_cl_kernel(ReweightGeometry<index_t> g, int width, const scalar_t* __restrict__ grad,
                                const scalar_t* __restrict__ x, const scalar_t* __restrict__ s,
                                const scalar_t* __restrict__ a, scalar_t* __restrict__ dx,
                                acc_t* __restrict__ partial) {
  CUDA_KERNEL_ASSERT(blockDim.x == cuda::kTeamThreads && blockDim.y == 1 && blockDim.z == 1);
  const int64_t positions = static_cast<int64_t>(g.N) * g.T * g.P;
  EPAMX_TEAM_LOOP(position, lane, positions, width) {
    const bool active = position < positions;  // else a padding lane: it shuffles, and touches no memory
    acc_t sum = active ? reweight_backward_lane_cl<scalar_t, acc_t, index_t>(
                             static_cast<index_t>(position), static_cast<index_t>(lane), static_cast<index_t>(width), g,
                             grad, x, s, a, dx)
                       : acc_t(0);
    for (int offset = width / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (active && lane == 0) partial[position] = sum;
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
  // x is read and out written in x's memory format, NCTHW or NTHWC; other strides are copied into the format x
  // suggests (as on the CPU).
  const at::MemoryFormat format = x_in.suggest_memory_format();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast3d;
  const at::Tensor x = x_in.contiguous(format), s = spatial_in.contiguous(), a = temporal_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return out;
  check_int32_indexing(x, op, "x");
  const auto g = reweight_geometry<int32_t>(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto numel = static_cast<int32_t>(x.numel());
    const auto launch = [&](auto kernel) {
      kernel<<<cuda::blocks_for(numel), cuda::kThreadsPerBlock, 0, stream>>>(
          g, x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (channels_last) {
      launch(reweight_forward_kernel<true, scalar_t, acc_t, int32_t>);
    } else {
      launch(reweight_forward_kernel<false, scalar_t, acc_t, int32_t>);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_reweight_backward_cuda(const at::Tensor& grad_in,
                                                                                const at::Tensor& x_in,
                                                                                const at::Tensor& spatial_in,
                                                                                const at::Tensor& temporal_in) {
  constexpr const char* op = "_attention_reweight_backward";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  check_reweight_grad(grad_in, x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat format = x_in.suggest_memory_format();  // grad is read and dx written in x's format
  const bool channels_last = format == at::MemoryFormat::ChannelsLast3d;
  const at::Tensor grad = grad_in.contiguous(format), x = x_in.contiguous(format), s = spatial_in.contiguous(),
                   a = temporal_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor ds = at::empty(s.sizes(), s.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  // Sums over no channels or no pixels are zero (dA is not empty when only H*W is).
  if (x.numel() == 0) return {dx, ds.zero_(), da.zero_()};
  const int64_t positions = x.size(0) * x.size(2) * x.size(3) * x.size(4);
  // NCTHW: channel groups, so that groups * positions threads are in flight; NTHWC: one group, a team per position.
  const int64_t groups =
      channels_last ? 1 : std::clamp<int64_t>((kTargetThreads + positions - 1) / positions, 1, x.size(1));
  check_int32_indexing(x, op, "x");  // groups * positions <= C * positions = x.numel()
  const auto g = reweight_geometry<int32_t>(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({groups * positions}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (channels_last) {
      const int width = team_width(x.size(1));
      reweight_backward_cl_kernel<scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(cuda::team_threads(positions, width), cuda::kTeamThreads), cuda::kTeamThreads, 0,
             stream>>>(g, width, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       s.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                       partial.mutable_data_ptr<acc_t>());
    } else {
      const auto threads = static_cast<int32_t>(groups * positions);
      reweight_backward_kernel<scalar_t, acc_t, int32_t>
          <<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
              g, static_cast<int32_t>(groups), grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              s.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
              partial.mutable_data_ptr<acc_t>(), threads);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reweight_backward_finish_kernel<kFinishThreads, scalar_t, acc_t, int32_t>
        <<<cuda::blocks_for(int64_t(g.N) * g.T, 1), kFinishThreads, 0, stream>>>(
            g, static_cast<int32_t>(groups), partial.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(),
            a.const_data_ptr<scalar_t>(), ds.mutable_data_ptr<scalar_t>(), da.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, ds, da};
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) {
  m.impl("attention_reweight", &attention_reweight_cuda);
  m.impl("_attention_reweight_backward", &attention_reweight_backward_cuda);
}

}  // namespace epamx
