#pragma once
// Temporal shift: argument checks and the [N, T, C, P] geometry, shared by the CPU and CUDA front ends.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "common/checks.h"
#include "temporal_shift/temporal_shift_math.h"

namespace epamx {

// What the checks found out about a temporal-shift input.
struct ShiftLayout {
  int64_t N, T, C, P, fold;
  bool time_major;  // (N*T, C, H, W) rather than (N, C, T, H, W)
  int64_t plane_dim;  // first of the two (H, W) dims
};

inline ShiftLayout check_shift_args(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments,
                                    const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK_VALUE(fold_div >= 1, op, ": fold_div must be >= 1, got ", fold_div);
  ShiftLayout L{};
  if (x.dim() == 5) {
    TORCH_CHECK_VALUE(!num_segments.has_value() || *num_segments == x.size(2), op,
                      ": num_segments must be None (or equal T = input.size(2) = ", x.size(2),
                      ") for a 5-D input (N, C, T, H, W), got ", num_segments.value_or(0));
    L.N = x.size(0);
    L.C = x.size(1);
    L.T = x.size(2);
    L.time_major = false;
    L.plane_dim = 3;
  } else if (x.dim() == 4) {
    TORCH_CHECK_VALUE(num_segments.has_value(), op,
                      ": num_segments (frames per clip) is required for a 4-D input (N*T, C, H, W)");
    TORCH_CHECK_VALUE(*num_segments >= 1, op, ": num_segments must be >= 1, got ", *num_segments);
    TORCH_CHECK_VALUE(x.size(0) % *num_segments == 0, op, ": input.size(0) = N*T = ", x.size(0),
                      " must be divisible by num_segments = ", *num_segments);
    L.T = *num_segments;
    L.N = x.size(0) / L.T;
    L.C = x.size(1);
    L.time_major = true;
    L.plane_dim = 2;
  } else {
    TORCH_CHECK_VALUE(false, op, ": input must be 5-D (N, C, T, H, W) or 4-D (N*T, C, H, W) with num_segments, got ",
                      x.dim(), "-D of shape ", x.sizes());
  }
  L.P = x.size(L.plane_dim) * x.size(L.plane_dim + 1);
  L.fold = L.C / fold_div;
  TORCH_CHECK_VALUE(2 * L.fold <= L.C, op, ": fold = C // fold_div = ", L.C, " // ", fold_div, " = ", L.fold,
                    " must be at most C / 2 so that the two shifted groups fit; use fold_div >= 2");
  return L;
}

// Whether the kernels can read `x` as it is: each (H, W) frame plane must be dense.
inline bool shift_planes_dense(const at::Tensor& x, const ShiftLayout& L) {
  return dims_are_dense(x, L.plane_dim, 2);
}

template <typename index_t>
ShiftGeometry<index_t> shift_geometry(const at::Tensor& x, const ShiftLayout& L) {
  ShiftGeometry<index_t> g{};
  g.N = static_cast<index_t>(L.N);
  g.T = static_cast<index_t>(L.T);
  g.C = static_cast<index_t>(L.C);
  g.P = static_cast<index_t>(L.P);
  g.fold = static_cast<index_t>(L.fold);
  g.time_major = L.time_major;
  if (L.time_major) {
    g.stride_t = static_cast<index_t>(x.stride(0));
    g.stride_n = static_cast<index_t>(x.stride(0) * L.T);
    g.stride_c = static_cast<index_t>(x.stride(1));
  } else {
    g.stride_n = static_cast<index_t>(x.stride(0));
    g.stride_c = static_cast<index_t>(x.stride(1));
    g.stride_t = static_cast<index_t>(x.stride(2));
  }
  return g;
}

// Whether every element offset of `x` (and a contiguous tensor of its size) fits in int32.
inline bool fits_int32(const at::Tensor& x) {
  int64_t max_offset = 0;
  for (int64_t d = 0; d < x.dim(); ++d) max_offset += (x.size(d) - 1) * x.stride(d);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  return x.numel() < kMax && max_offset < kMax;
}

// Runs f.template operator()<bits_t>() with an unsigned integer type of x's element size.
template <typename F>
void dispatch_by_element_size(const at::Tensor& x, const char* op, F&& f) {
  switch (x.element_size()) {
    case 2: f.template operator()<uint16_t>(); break;
    case 4: f.template operator()<uint32_t>(); break;
    case 8: f.template operator()<uint64_t>(); break;
    default: TORCH_CHECK(false, op, ": unsupported element size ", x.element_size());
  }
}

}  // namespace epamx

namespace epamx {

// Test hook, CPU only: runs the CUDA kernels' per-thread bodies for the thread indices in `thread_order`
// (any order): in place on a contiguous version of `input` (`input` itself when contiguous) when `inplace`,
// else into a new contiguous tensor; returns the result. If a kernel's result depended on the order its
// threads ran in, shuffled orders would expose the race.
at::Tensor temporal_shift_run_thread_bodies(at::Tensor input, int64_t fold_div, std::optional<int64_t> num_segments,
                                            bool inplace, bool backward, const at::Tensor& thread_order);

}  // namespace epamx
