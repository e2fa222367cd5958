#pragma once
// Task sizes for at::parallel_for in the CPU kernels.
#include <algorithm>
#include <cstdint>

namespace epamx {

// Elements per parallel task: large enough to amortise scheduling, small enough to split EPAM-Net's tensors.
constexpr int64_t kGrainElements = 1 << 15;

// The grain, in items, for items of `elements_per_item` elements each (at least one item per task).
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

}  // namespace epamx
