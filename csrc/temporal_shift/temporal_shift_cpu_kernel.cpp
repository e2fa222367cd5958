// The temporal shift's out-of-place channels-last frame assembly, vectorised (compiled once per instruction set).
#include "temporal_shift/temporal_shift_cpu_kernel.h"

#include "temporal_shift/temporal_shift_math.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace epamx {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kPixelBlock = 256;

// Channels [c0, c0 + count) of `pixels` rows of `row` elements: copied from `src`'s same rows, or zeros where
// `src` is null.
template <typename bits_t>
void patch_channels(bits_t* dst, const bits_t* src, int64_t c0, int64_t count, int64_t row, int64_t pixels) {
  for (int64_t p = 0; p < pixels; ++p) {
    bits_t* o = dst + p * row + c0;
    if (src == nullptr) {
      for (int64_t k = 0; k < count; ++k) o[k] = bits_t(0);
    } else {
      const bits_t* i = src + p * row + c0;
      for (int64_t k = 0; k < count; ++k) o[k] = i[k];
    }
  }
}

// Per block of pixels: one bulk copy of whole rows from the unshifted frame, then the two shifted groups patched
// in while the block is in cache (per-pixel copies of a few channels each ran 3-7x slower than a plain copy).
template <typename bits_t>
void assemble_by_blocks(bits_t* out, const bits_t* first, const bits_t* second, const bits_t* rest, int64_t P,
                        int64_t C, int64_t fold) {
  for (int64_t p0 = 0; p0 < P; p0 += kPixelBlock) {
    const int64_t pixels = std::min(kPixelBlock, P - p0), at = p0 * C;
    bits_t* o = out + at;
    std::copy_n(rest + at, pixels * C, o);
    patch_channels(o, first ? first + at : nullptr, 0, fold, C, pixels);
    patch_channels(o, second ? second + at : nullptr, fold, fold, C, pixels);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 512-bit blends of 2-, 4- and 8-byte lanes under a mask.
template <int Bytes>
struct Lanes;
template <>
struct Lanes<2> {
  using mask_t = __mmask32;
  static __m512i blend(mask_t m, __m512i a, __m512i b) { return _mm512_mask_blend_epi16(m, a, b); }
};
template <>
struct Lanes<4> {
  using mask_t = __mmask16;
  static __m512i blend(mask_t m, __m512i a, __m512i b) { return _mm512_mask_blend_epi32(m, a, b); }
};
template <>
struct Lanes<8> {
  using mask_t = __mmask8;
  static __m512i blend(mask_t m, __m512i a, __m512i b) { return _mm512_mask_blend_epi64(m, a, b); }
};

// A frame as one stream of P * C elements in whole vectors: each vector is `rest`'s, with the lanes of `first` and
// `second` blended in under their masks, which repeat every lcm(C, lanes) elements; the last partial vector
// element by element. The three source frames stay in L2 between neighbouring output frames: about 2x a plain
// copy's time, where the per-pixel patches of a few channels (3 of 24 in EPAM-Net's first blocks) took 3-4x.
template <typename bits_t>
class VectorAssembler {
 public:
  using L = Lanes<sizeof(bits_t)>;
  using mask_t = typename L::mask_t;
  static constexpr int64_t W = 64 / sizeof(bits_t);

  VectorAssembler(int64_t C, int64_t fold) : C_(C), fold_(fold) {
    const int64_t vectors = std::lcm(C, W) / W;
    first_lanes_.assign(static_cast<size_t>(vectors), 0);
    second_lanes_.assign(static_cast<size_t>(vectors), 0);
    for (int64_t k = 0, c = 0; k < vectors * W; ++k, c = (c + 1 == C) ? 0 : c + 1) {
      const mask_t bit = mask_t(mask_t(1) << (k % W));
      if (c < fold) {
        first_lanes_[k / W] |= bit;
      } else if (c < 2 * fold) {
        second_lanes_[k / W] |= bit;
      }
    }
  }

  void operator()(bits_t* out, const bits_t* first, const bits_t* second, const bits_t* rest, int64_t total) const {
    const int64_t vectors = static_cast<int64_t>(first_lanes_.size());
    const __m512i zero = _mm512_setzero_si512();
    int64_t k = 0, j = 0;
    // Whole vectors: plain loads of the three sources (cheaper than masked merging loads), two blends.
    for (; k + W <= total; k += W, j = (j + 1 == vectors) ? 0 : j + 1) {
      __m512i v = _mm512_loadu_si512(rest + k);
      v = L::blend(first_lanes_[j], v, first != nullptr ? _mm512_loadu_si512(first + k) : zero);
      v = L::blend(second_lanes_[j], v, second != nullptr ? _mm512_loadu_si512(second + k) : zero);
      _mm512_storeu_si512(out + k, v);
    }
    for (; k < total; ++k) {
      const int64_t c = k % C_;
      const bits_t* source = c < fold_ ? first : c < 2 * fold_ ? second : rest;
      out[k] = source != nullptr ? source[k] : bits_t(0);
    }
  }

 private:
  int64_t C_, fold_;
  // The lanes `first` and `second` fill, for the vectors of one period of lcm(C, W) elements.
  std::vector<mask_t> first_lanes_, second_lanes_;
};
#endif

}  // namespace

// Rows shorter than this many bytes are assembled by VectorAssembler; longer ones by blocks (their bulk copy
// dominates, and it measured 0.85-1.0x the vector assembly's time at 384-byte rows, 1.1-1.8x below 256).
constexpr int64_t kVectorRowBytes = 256;

template <typename bits_t>
void shift_frames_channels_last(const bits_t* x, bits_t* out, int64_t T, int64_t P, int64_t C, int64_t fold, int sign,
                                int64_t f0, int64_t f1) {
  const int64_t frame = P * C;
#if defined(CPU_CAPABILITY_AVX512)
  const bool by_vectors = C * static_cast<int64_t>(sizeof(bits_t)) < kVectorRowBytes;
  const VectorAssembler<bits_t> assemble(by_vectors ? C : 1, by_vectors ? fold : 0);
#endif
  for (int64_t f = f0; f < f1; ++f) {
    const int64_t t = f % T;
    // The frame channel c's group reads (shift_source_frame), or null where the shift pads with zeros.
    const auto source = [&](int64_t c) -> const bits_t* {
      const int64_t s = shift_source_frame<int64_t>(t, c, T, fold, sign);
      return s < 0 ? nullptr : x + (f - t + s) * frame;
    };
#if defined(CPU_CAPABILITY_AVX512)
    if (by_vectors) {
      assemble(out + f * frame, source(0), source(fold), source(2 * fold), frame);
      continue;
    }
#endif
    assemble_by_blocks(out + f * frame, source(0), source(fold), source(2 * fold), P, C, fold);
  }
}

#define EPAMX_INSTANTIATE(bits_t)                                                                          \
  template void shift_frames_channels_last<bits_t>(const bits_t*, bits_t*, int64_t, int64_t, int64_t, int64_t, int, \
                                                   int64_t, int64_t);
EPAMX_INSTANTIATE(uint16_t)
EPAMX_INSTANTIATE(uint32_t)
EPAMX_INSTANTIATE(uint64_t)
#undef EPAMX_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace epamx
