#pragma once
// Channel pooling: argument checks shared by the CPU and CUDA front ends.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "channel_pool/channel_pool_math.h"
#include "common/checks.h"

namespace epamx {

inline void check_pool_args(const at::Tensor& x, int64_t t_stride, const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": x must be 5-D (N, C, T, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": x must have at least one channel to pool over, got shape ", x.sizes());
  TORCH_CHECK_VALUE(t_stride >= 1, op, ": t_stride must be >= 1, got ", t_stride);
}

// A t_stride of T or more reads frame 0 only, as T does: clamped to T, it fits any index type the tensor's sizes
// fit (a t_stride of 2^32 narrowed to int32 would be 0, and T + t_stride - 1 overflows int64 near its maximum).
inline int64_t effective_t_stride(const at::Tensor& x, int64_t t_stride) {
  return std::min<int64_t>(t_stride, std::max<int64_t>(x.size(2), 1));
}

template <typename index_t>
PoolGeometry<index_t> pool_geometry(const at::Tensor& x, int64_t t_stride) {
  const int64_t T = x.size(2), stride = effective_t_stride(x, t_stride);
  return {static_cast<index_t>(x.size(0)), static_cast<index_t>(x.size(1)), static_cast<index_t>(T),
          static_cast<index_t>(x.size(3) * x.size(4)), static_cast<index_t>(stride),
          static_cast<index_t>((T + stride - 1) / stride)};
}

inline std::vector<int64_t> pool_output_shape(const at::Tensor& x, int64_t t_stride) {
  const int64_t stride = effective_t_stride(x, t_stride);
  return {x.size(0), 2, (x.size(2) + stride - 1) / stride, x.size(3), x.size(4)};
}

inline void check_pool_grad(const at::Tensor& grad, const at::Tensor& x, int64_t t_stride, const char* op) {
  const auto expected = pool_output_shape(x, t_stride);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(expected), op, ": grad must have shape ", at::IntArrayRef(expected),
                    " (N, 2, T', H, W), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ", x.scalar_type(),
                   ", got ", grad.scalar_type());
  check_same_device(grad, "grad", x, "x", op);
}

// Test hook, CPU only: runs the CUDA kernel's per-thread bodies (forward, or backward with `grad`) for the
// thread indices in `order`, any order: one per output (forward) or input (backward) position. For a
// channels_last_3d x, the NTHWC kernels' bodies: position i's team, its lanes in descending order combined by
// team_butterfly; the result is then channels_last_3d too.
at::Tensor channel_pool_run_thread_bodies(const at::Tensor& x, int64_t t_stride, const std::optional<at::Tensor>& grad,
                                          const at::Tensor& order);

}  // namespace epamx
