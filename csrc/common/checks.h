#pragma once
// Argument checks whose messages name the argument and what was expected.
// Type problems raise TypeError, bad values/shapes ValueError, device problems RuntimeError.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace epamx {

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ", arg,
                   " must be a floating tensor (float32, float64, float16 or bfloat16), got ", dt);
}

inline void check_same_device(const at::Tensor& a, const char* arg_a, const at::Tensor& b, const char* arg_b,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", arg_a, " and ", arg_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* op, const char* arg) {
  TORCH_CHECK(t.device().type() == type, op, ": ", arg, " must be a ", c10::DeviceTypeName(type, true),
              " tensor, got one on ", t.device());
}

// True when dims [first, first+count) of `t` can be flattened into one dimension of stride 1.
inline bool dims_are_dense(const at::Tensor& t, int64_t first, int64_t count) {
  int64_t expected = 1;
  for (int64_t d = first + count - 1; d >= first; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Whether no two elements of `t` can share memory, decided from its sizes and strides alone. at::has_internal_overlap
// answers only for dense tensors (no) and stride-0 dims (yes), and "too hard" for everything else, such as an
// as_strided view whose strides are all 1. Here the dims are sorted by stride, and each stride must exceed the
// furthest offset the smaller-stride dims reach. That holds for every view torch's slicing, permuting and
// transposing make; the few interleaved layouts it cannot prove (sizes (3, 2), strides (2, 3)) count as overlapping.
inline bool provably_no_internal_overlap(const at::Tensor& t) {
  const at::MemOverlap overlap = at::has_internal_overlap(t);
  if (overlap != at::MemOverlap::TooHard) return overlap == at::MemOverlap::No;
  if (t.numel() == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims that index more than one element
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset reachable through the dims before this one
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

// For in-place kernels, whose result would depend on the order elements are written if two of them aliased.
inline void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(provably_no_internal_overlap(t), op, ": ", arg,
                    " must not have overlapping memory (two elements sharing an address, as after expand() or "
                    "as_strided()); clone() it first. Sizes ", t.sizes(), ", strides ", t.strides());
}

// Whether every element offset of `x` (and a contiguous tensor of its size) fits in int32.
inline bool fits_int32(const at::Tensor& x) {
  int64_t max_offset = 0;
  for (int64_t d = 0; d < x.dim(); ++d) max_offset += (x.size(d) - 1) * x.stride(d);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  return x.numel() < kMax && max_offset < kMax;
}

// Runs body.template operator()<index_t>() with the index type a kernel over `tensors` (offsets and element counts)
// needs: int32 where every one fits it (fits_int32), else int64.
template <typename F>
void dispatch_index_type(std::initializer_list<const at::Tensor*> tensors, F&& body) {
  bool narrow = true;
  for (const at::Tensor* t : tensors) narrow = narrow && (!t->defined() || fits_int32(*t));
  if (narrow) {
    body.template operator()<int32_t>();
  } else {
    body.template operator()<int64_t>();
  }
}

// For kernels that index with int32 only.
inline void check_int32_indexing(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(fits_int32(t), op, ": ", arg, " has ", t.numel(),
              " elements; this kernel indexes with int32 and supports at most 2^31 - 1");
}

}  // namespace epamx
