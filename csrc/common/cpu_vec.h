#pragma once
// Vector loads and stores for the CPU kernels built once per instruction set (common/cpu_isa.h); include it only
// from those *_cpu_kernel.cpp files. Everything here lives in epamx::<CPU_CAPABILITY>, so no two builds share it.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace epamx {
namespace CPU_CAPABILITY {

// Moves one vector of acc_t (float for half and bfloat16, else scalar_t itself) between registers and scalar_t
// elements: kWidth of them, or the first `count` < kWidth (a short load fills the other lanes with zeros).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr bool kConverts = !std::is_same_v<scalar_t, acc_t>;
  using StoredVec = at::vec::Vectorized<scalar_t>;  // holds at least kWidth elements

  static Vec load(const scalar_t* p) {
    if constexpr (kConverts) {
      return at::vec::convert<acc_t>(StoredVec::loadu(p, kWidth));
    } else {
      return Vec::loadu(p);
    }
  }
  static Vec load(const scalar_t* p, int64_t count) {
    if constexpr (kConverts) {
      return at::vec::convert<acc_t>(StoredVec::loadu(p, count));
    } else {
      return Vec::loadu(p, count);
    }
  }
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (kConverts) {
      at::vec::convert<scalar_t>(v).store(p, kWidth);
    } else {
      v.store(p);
    }
  }
  static void store(scalar_t* p, const Vec& v, int64_t count) {
    if constexpr (kConverts) {
      at::vec::convert<scalar_t>(v).store(p, count);
    } else {
      v.store(p, count);
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// 16 floats rounded to bfloat16 in registers, as c10::BFloat16 rounds (to nearest even; NaNs stay NaN, quieted):
// a bfloat16 is the high half of a float, so the rounding is integer arithmetic. at::vec's conversion of one float
// vector measured 2-3x slower.
inline __m256i float_to_bfloat16(__m512 f) {
  const __m512i i = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(i, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_or_si512(i, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// 16 bfloat16 values (the bits in h) as floats, exactly.
inline __m512 bfloat16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// The sum of the lanes of v.
template <typename acc_t>
acc_t sum_lanes(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Copies n elements with vector loads and stores: for short copies between buffers in cache (glibc's memcpy turns
// copies of a few KiB into `rep movsb`, which measured about half as fast on the 2-core machines).
template <typename scalar_t>
void copy_elements(scalar_t* dst, const scalar_t* src, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) Vec::loadu(src + k).store(dst + k);
  if (k < n) Vec::loadu(src + k, n - k).store(dst + k, n - k);
}

// Writes n elements from src (in cache) to dst with streaming stores where x86 has them: a large output written once
// then skips the read of its old contents into the cache that an ordinary store makes. Each thread that streams
// calls stream_fence() before its writes are read elsewhere.
template <typename scalar_t>
void stream_elements(scalar_t* dst, const scalar_t* src, int64_t n) {
#if defined(__SSE2__)
  constexpr int64_t kPerStore = 16 / sizeof(scalar_t);
  int64_t k = 0;
  for (; k < n && reinterpret_cast<uintptr_t>(dst + k) % 16 != 0; ++k) dst[k] = src[k];
  for (; k + kPerStore <= n; k += kPerStore) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
  }
  for (; k < n; ++k) dst[k] = src[k];
#else
  copy_elements(dst, src, n);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Per-position values the NCTHW kernels keep for a block of positions, on the stack: at most kBlock of them, plus
// a vector's worth of room for the last vector of a row.
constexpr int64_t kBlock = 1024;

// Splits frames [begin, end) (frame = n * T + t) into blocks of whole frames of one sample, as many as fit in
// kBlock at `footprint` >= P values each, or, for frames of more than kBlock positions, into pieces of one frame;
// calls fn(n, t0, frames, p0, len) for each, in order. A block's positions are [p0, p0 + len) of frames
// t0 .. t0 + frames - 1; len < P only when frames == 1.
template <typename F>
void for_each_block(int64_t begin, int64_t end, int64_t T, int64_t P, int64_t footprint, const F& fn) {
  const int64_t frames_per_block = std::max<int64_t>(1, kBlock / footprint), piece = std::min(P, kBlock);
  for (int64_t f = begin; f < end;) {
    const int64_t n = f / T, t0 = f % T;
    const int64_t frames = std::min({end - f, T - t0, frames_per_block});
    for (int64_t p0 = 0; p0 < P; p0 += piece) fn(n, t0, frames, p0, std::min(piece, P - p0));
    f += frames;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace epamx
