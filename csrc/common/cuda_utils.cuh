#pragma once
// Launch helpers shared by the CUDA kernels.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace epamx::cuda {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; grid-stride loops cover the rest. (The CUDA emulator,
// tools/cuda_emu, sets a small EPAMX_CUDA_MAX_BLOCKS so that its tests take those loops past their first round.)
#ifndef EPAMX_CUDA_MAX_BLOCKS
#define EPAMX_CUDA_MAX_BLOCKS (65535LL * 8)
#endif
constexpr int64_t kMaxBlocks = EPAMX_CUDA_MAX_BLOCKS;

inline unsigned int blocks_for(int64_t work_items, int threads = kThreadsPerBlock) {
  const int64_t blocks = (work_items + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// Threads a block of the team kernels (EPAMX_TEAM_LOOP below): whole warps, so that no team spans two warps.
constexpr int kTeamThreads = kThreadsPerBlock;
static_assert(kTeamThreads % 32 == 0, "team kernels need whole warps");

// The threads EPAMX_TEAM_LOOP runs over for `items` teams of `width` lanes: padded to whole warps.
__host__ __device__ constexpr int64_t team_threads(int64_t items, int width) { return (items * width + 31) / 32 * 32; }

}  // namespace epamx::cuda

// Each thread visits i, i + gridDim*blockDim, ... below n. The counter is 64-bit whatever index_t is (as in
// PyTorch's CUDA_KERNEL_LOOP_TYPE): with an int32 counter, the step past the last index wraps negative once n is
// within one grid (up to ~134M threads) of 2^31, `i < n` still holds, and the body indexes before the buffer.
// The body sees i as index_t, which holds every value below n.
#define EPAMX_GRID_STRIDE_LOOP(index_t, i, n)                                                                  \
  for (int64_t i##_wide = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;                        \
       i##_wide < static_cast<int64_t>(n); i##_wide += static_cast<int64_t>(blockDim.x) * gridDim.x)          \
    if (const index_t i = static_cast<index_t>(i##_wide); true)

// Teams of `width` lanes (common/teams.h: a power of two, at most 32), one per item: grid thread i is lane i % width
// of item i / width, grid-stride, both 64-bit (items * width can pass 2^31 where items does not). The thread count
// is padded to whole warps and blockDim.x must be a multiple of 32, so every lane of a warp runs the same iterations
// and can take part in a full-warp shuffle (__shfl_xor_sync(0xffffffff, ...)); a lane whose item is >= items (the
// padding) must shuffle like the others but touch no memory.
#define EPAMX_TEAM_LOOP(item, lane, items, width)                                                               \
  for (int64_t item##_i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,                          \
               item##_n = ::epamx::cuda::team_threads(static_cast<int64_t>(items), (width));                     \
       item##_i < item##_n; item##_i += static_cast<int64_t>(blockDim.x) * gridDim.x)                           \
    if (const int64_t item = item##_i / (width); true)                                                          \
      if (const int lane = static_cast<int>(item##_i % (width)); true)
