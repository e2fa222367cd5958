#pragma once
// Temporal shift (TSM), the math shared by the CPU and CUDA kernels.
//
// Definition (fold = C / fold_div): output frame t of channel c is input frame
//   t + 1  for c in [0, fold),   t - 1  for c in [fold, 2 * fold),   t  otherwise,
// and zero where that frame does not exist. The backward pass is the same shift with the directions
// swapped, so every function takes `sign`: +1 for the forward shift, -1 for its adjoint.
//
// Both layouts, (N, C, T, H, W) and (N*T, C, H, W), are seen through one logical view [N, T, C, P] with
// P = H*W pixels per frame plane (stride 1) and free strides for n, t and c. The shift only moves data, so
// kernels copy bit patterns in "units" of 2, 4, 8 or 16 bytes (one element or several neighbouring pixels):
// exact for every floating dtype, and a zero bit pattern is +0.0 in all of them. P and the strides below
// count units.
#include <cstdint>

#include "common/macros.h"

namespace epamx {

// A 16-byte copy unit: one load and one store move 4 float32 or 8 bfloat16 pixels.
struct alignas(16) Bits128 {
  uint64_t lo, hi;
  HOST_DEVICE_INLINE constexpr explicit Bits128(int zero = 0) : lo(zero), hi(zero) {}
};

template <typename index_t>
struct ShiftGeometry {
  index_t N, T, C, P;
  index_t stride_n, stride_t, stride_c;  // of the tensor read (in place: read and written)
  index_t stride_p;  // between pixels: 1 (dense frame planes), or e.g. C for channels-last tensors (in place)
  index_t fold;
  bool time_major;  // output plane order: (n, t, c) for (N*T, C, H, W) tensors, else (n, c, t)
  bool channels_inner;  // in place: neighbouring threads take neighbouring channels (channels-last memory)
};

// Frames channel c reads ahead: +1 (frame t+1), -1 (frame t-1) or 0.
template <typename index_t>
HOST_DEVICE_INLINE int shift_offset(index_t c, index_t fold, int sign) {
  return c < fold ? sign : (c < 2 * fold ? -sign : 0);
}

// The input frame output frame t of channel c copies, or -1 where the shift pads with zeros.
template <typename index_t>
HOST_DEVICE_INLINE index_t shift_source_frame(index_t t, index_t c, index_t T, index_t fold, int sign) {
  const index_t s = t + shift_offset(c, fold, sign);
  return (s < 0 || s >= T) ? index_t(-1) : s;
}

// ---- out of place: output elements [p0, p0 + count) of contiguous output plane q ----------------------------
template <typename bits_t, typename index_t>
HOST_DEVICE_INLINE void shift_plane_run(index_t q, index_t p0, index_t count, const ShiftGeometry<index_t>& g,
                                        int sign, const bits_t* in, bits_t* out) {
  index_t n, t, c;
  if (g.time_major) {
    c = q % g.C;
    q /= g.C;
    t = q % g.T;
    n = q / g.T;
  } else {
    t = q % g.T;
    q /= g.T;
    c = q % g.C;
    n = q / g.C;
  }
  bits_t* dst = out + (g.time_major ? (n * g.T + t) * g.C + c : (n * g.C + c) * g.T + t) * g.P + p0;
  const index_t s = shift_source_frame(t, c, g.T, g.fold, sign);
  if (s < 0) {
    for (index_t k = 0; k < count; ++k) dst[k] = bits_t(0);
    return;
  }
  const bits_t* src = in + n * g.stride_n + s * g.stride_t + c * g.stride_c + p0;
  for (index_t k = 0; k < count; ++k) dst[k] = src[k];
}

// One GPU thread of the out-of-place kernel: output element i (N*T*C*P threads). Each input element is read
// at most once and each output element written exactly once.
template <typename bits_t, typename index_t>
HOST_DEVICE_INLINE void shift_copy_thread(index_t i, const ShiftGeometry<index_t>& g, int sign, const bits_t* in,
                                          bits_t* out) {
  shift_plane_run(i / g.P, i % g.P, index_t(1), g, sign, in, out);
}

// ---- in place: columns (n, c, p0 .. p0+count) of a shifted channel c < 2*fold ----------------------------------
// A column is walked along t in the direction that reads every frame before it is overwritten, so a column
// needs no buffer. Distinct columns never touch the same memory: owning whole columns is what makes the
// GPU kernel race-free, whatever order its threads run in. Runs of count > 1 need dense planes (stride_p 1).
template <typename bits_t, typename index_t>
HOST_DEVICE_INLINE void shift_columns_inplace(index_t n, index_t c, index_t p0, index_t count,
                                              const ShiftGeometry<index_t>& g, int sign, bits_t* x) {
  bits_t* col = x + n * g.stride_n + c * g.stride_c + p0 * g.stride_p;
  const index_t st = g.stride_t;
  if (shift_offset(c, g.fold, sign) > 0) {
    for (index_t t = 0; t + 1 < g.T; ++t) {
      bits_t* dst = col + t * st;
      const bits_t* src = dst + st;
      for (index_t k = 0; k < count; ++k) dst[k] = src[k];
    }
    bits_t* last = col + (g.T - 1) * st;
    for (index_t k = 0; k < count; ++k) last[k] = bits_t(0);
  } else {
    for (index_t t = g.T - 1; t > 0; --t) {
      bits_t* dst = col + t * st;
      const bits_t* src = dst - st;
      for (index_t k = 0; k < count; ++k) dst[k] = src[k];
    }
    for (index_t k = 0; k < count; ++k) col[k] = bits_t(0);
  }
}

// Number of GPU threads of the in-place kernel: one per column of a shifted channel.
template <typename index_t>
HOST_DEVICE_INLINE index_t shift_inplace_threads(const ShiftGeometry<index_t>& g) {
  return g.N * 2 * g.fold * g.P;
}

// One GPU thread of the in-place kernel: column j, with whichever of pixels and channels is contiguous in memory
// fastest, so neighbouring threads touch neighbouring addresses.
template <typename bits_t, typename index_t>
HOST_DEVICE_INLINE void shift_inplace_thread(index_t j, const ShiftGeometry<index_t>& g, int sign, bits_t* x) {
  const index_t shifted = 2 * g.fold;
  index_t n, c, p;
  if (g.channels_inner) {
    c = j % shifted;
    p = (j / shifted) % g.P;
    n = j / shifted / g.P;
  } else {
    p = j % g.P;
    c = (j / g.P) % shifted;
    n = j / g.P / shifted;
  }
  shift_columns_inplace(n, c, p, index_t(1), g, sign, x);
}

}  // namespace epamx
