#pragma once
// Launch helpers shared by the CUDA kernels.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace epamx::cuda {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = 65535LL * 8;

inline unsigned int blocks_for(int64_t work_items, int threads = kThreadsPerBlock) {
  const int64_t blocks = (work_items + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

}  // namespace epamx::cuda

// Each thread visits i, i + gridDim*blockDim, ... below n. The counter is 64-bit whatever index_t is (as in
// PyTorch's CUDA_KERNEL_LOOP_TYPE): with an int32 counter, the step past the last index wraps negative once n is
// within one grid (up to ~134M threads) of 2^31, `i < n` still holds, and the body indexes before the buffer.
// The body sees i as index_t, which holds every value below n.
#define EPAMX_GRID_STRIDE_LOOP(index_t, i, n)                                                                  \
  for (int64_t i##_wide = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;                        \
       i##_wide < static_cast<int64_t>(n); i##_wide += static_cast<int64_t>(blockDim.x) * gridDim.x)          \
    if (const index_t i = static_cast<index_t>(i##_wide); true)
