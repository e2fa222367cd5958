#pragma once
// Temporal shift: argument checks and the [N, T, C, P] geometry, shared by the CPU and CUDA front ends.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
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
  // A fold of 0 would make the shift an identity that no one asked for (a typo in fold_div, or too few channels).
  TORCH_CHECK_VALUE(L.fold >= 1 || L.C == 0, op, ": fold = C // fold_div = ", L.C, " // ", fold_div,
                    " = 0 shifts no channel; use fold_div <= C (C = ", L.C, ")");
  return L;
}

// Whether the kernels can read `x` as it is: each (H, W) frame plane must be dense.
inline bool shift_planes_dense(const at::Tensor& x, const ShiftLayout& L) {
  return dims_are_dense(x, L.plane_dim, 2);
}

// Whether the in-place kernels can walk `x` as it is: its pixels must have one stride (H and W merge), as in
// dense planes or channels-last memory.
inline bool shift_pixels_uniform(const at::Tensor& x, const ShiftLayout& L) {
  const int64_t h = L.plane_dim, w = L.plane_dim + 1;
  return x.size(h) == 1 || x.size(w) == 1 || x.stride(h) == x.size(w) * x.stride(w);
}

// The widest copy unit, in bytes (16, 8, 4 or 2, never less than one element), that divides the frame plane,
// every stride in use and the addresses of `x` and `other` (the output, if any).
inline int64_t shift_copy_unit(const at::Tensor& x, const ShiftLayout& L, const at::Tensor* other = nullptr) {
  const int64_t element = x.element_size();
  int64_t lengths[5] = {L.P * element, 0, 0, 0, 0};
  int count = 1;
  for (int64_t d = 0; d < L.plane_dim; ++d) {
    if (x.size(d) > 1) lengths[count++] = x.stride(d) * element;
  }
  const auto address = [](const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); };
  for (int64_t unit = 16; unit > element; unit /= 2) {
    bool fits = address(x) % unit == 0 && (other == nullptr || address(*other) % unit == 0);
    for (int i = 0; i < count && fits; ++i) fits = lengths[i] % unit == 0;
    if (fits) return unit;
  }
  return element;
}

// The [N, T, C, P] geometry of `x` (frame planes dense) in copy units of `unit_bytes`.
template <typename index_t>
ShiftGeometry<index_t> shift_geometry(const at::Tensor& x, const ShiftLayout& L, int64_t unit_bytes) {
  const int64_t per_unit = unit_bytes / x.element_size();
  ShiftGeometry<index_t> g{};
  g.N = static_cast<index_t>(L.N);
  g.T = static_cast<index_t>(L.T);
  g.C = static_cast<index_t>(L.C);
  g.P = static_cast<index_t>(L.P / per_unit);
  g.fold = static_cast<index_t>(L.fold);
  g.time_major = L.time_major;
  g.stride_p = 1;
  g.channels_inner = false;
  // A stride of a size-1 dim is never multiplied by anything but 0, so it need not divide evenly.
  const auto units = [&](int64_t stride) { return static_cast<index_t>(stride / per_unit); };
  if (L.time_major) {
    g.stride_t = units(x.stride(0));
    g.stride_n = units(x.stride(0) * L.T);
    g.stride_c = units(x.stride(1));
  } else {
    g.stride_n = units(x.stride(0));
    g.stride_c = units(x.stride(1));
    g.stride_t = units(x.stride(2));
  }
  return g;
}

// The kernels write a contiguous result; a channels-last input gets a channels-last result, so the convolution
// after the shift sees one memory format (a mixed pair falls off oneDNN's fast path, about 10x slower here).
inline at::Tensor keep_memory_format(const at::Tensor& out, const at::Tensor& input) {
  return out.contiguous(input.suggest_memory_format());
}

// The geometry of `x` with strided pixels (channels-last, say), element by element, for the in-place kernels.
template <typename index_t>
ShiftGeometry<index_t> shift_geometry_strided(const at::Tensor& x, const ShiftLayout& L) {
  auto g = shift_geometry<index_t>(x, L, x.element_size());
  const int64_t h = L.plane_dim, w = L.plane_dim + 1;
  g.stride_p = static_cast<index_t>(x.size(w) > 1 ? x.stride(w) : x.stride(h));
  g.channels_inner = x.stride(1) < g.stride_p;
  return g;
}

// Runs f.template operator()<bits_t>() with the type of a `unit_bytes`-byte copy unit.
template <typename F>
void dispatch_by_unit(int64_t unit_bytes, const char* op, F&& f) {
  switch (unit_bytes) {
    case 2: f.template operator()<uint16_t>(); break;
    case 4: f.template operator()<uint32_t>(); break;
    case 8: f.template operator()<uint64_t>(); break;
    case 16: f.template operator()<Bits128>(); break;
    default: TORCH_CHECK(false, op, ": unsupported copy unit of ", unit_bytes, " bytes");
  }
}

}  // namespace epamx

namespace epamx {

// Test hook, CPU only: runs the CUDA kernels' per-thread bodies, with the copy unit the CUDA kernels would
// pick, for the thread indices in `thread_order` (any order): in place on a contiguous version of `input` (`input` itself when contiguous) when `inplace`,
// else into a new contiguous tensor; returns the result. If a kernel's result depended on the order its
// threads ran in, shuffled orders would expose the race.
at::Tensor temporal_shift_run_thread_bodies(at::Tensor input, int64_t fold_div, std::optional<int64_t> num_segments,
                                            bool inplace, bool backward, const at::Tensor& thread_order);

}  // namespace epamx
