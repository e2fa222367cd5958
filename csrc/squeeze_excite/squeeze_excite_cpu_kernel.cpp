// Squeeze-and-excitation's passes in inference, vectorised (compiled once per instruction set).
#include "squeeze_excite/squeeze_excite_cpu_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <limits>
#include <numeric>
#include <vector>
#include <type_traits>

#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace epamx {
namespace CPU_CAPABILITY {
namespace {

// VecIO, with bfloat16 converted in registers where AVX-512 is built (common/cpu_vec.h, float_to_bfloat16).
template <typename scalar_t>
struct Io : VecIO<scalar_t> {};

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Io<c10::BFloat16> : VecIO<c10::BFloat16> {
  using Vec = at::vec::Vectorized<float>;
  static __mmask16 mask(int64_t count) { return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1); }
  static Vec load(const c10::BFloat16* p, int64_t count = 16) {
    return Vec(bfloat16_to_float(_mm256_maskz_loadu_epi16(mask(count), p)));
  }
  static void store(c10::BFloat16* p, const Vec& v, int64_t count = 16) {
    _mm256_mask_storeu_epi16(p, mask(count), float_to_bfloat16(v));
  }
};
#endif

// z * sigmoid(z) = z / (1 + exp(-z)).
template <typename Vec>
Vec silu(const Vec& z) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) {
    // exp(-z) = 2^n e^r with n = round(-z log2(e)) and r = -z - n ln(2) in [-ln(2)/2, ln(2)/2], r by two FMAs
    // with ln(2) split in a high part exact in float and the rest (so that r stays exact for large |z|), e^r by its
    // degree-6 Taylor polynomial (relative error about 1e-7), 2^n by scalef (exact; inf beyond the float range);
    // then the reciprocal of 1 + exp(-z) as a 14-bit estimate refined by one Newton step, 0 where exp(-z)
    // overflowed (the step would give 0 * (2 - inf * 0) = NaN), so that z < -88.7 gives -0 and z = -inf NaN, as
    // F.silu. Within a few float32 ulp of z * sigmoid(z) (tests/ops/test_squeeze_excite.py), in 19 vector
    // operations where exp_u20 and a division took about 26: this pass is compute-bound.
    const __m512 zv = z;
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(zv, _mm512_set1_ps(-1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693145751953125f), zv);  // -(n ln2_hi) - z
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     // - n ln2_lo
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
    const __m512 q0 = _mm512_rcp14_ps(d);
    __m512 q = _mm512_mul_ps(q0, _mm512_fnmadd_ps(d, q0, _mm512_set1_ps(2.0f)));
    q = _mm512_mask_mov_ps(q, _mm512_cmp_ps_mask(d, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_GT_OQ),
                           _mm512_setzero_ps());
    return Vec(_mm512_mul_ps(zv, q));
  }
#endif
  return z / (Vec(1) + z.neg().exp_u20());
}

#if defined(CPU_CAPABILITY_AVX512)
// silu for a bfloat16 result (8 significant bits): e^r by its degree-4 Taylor polynomial (relative error 4e-5) and
// the 14-bit reciprocal estimate without the Newton step (6e-5), about 1e-4 in all against the 2e-3 of bfloat16's
// own rounding, in 12 vector operations. rcp14(inf) = 0 gives z < -88.7 -> -0 and z = -inf -> NaN as above.
inline __m512 silu_for_bf16(__m512 z) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(-1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693145751953125f), z);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 24), r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(z, _mm512_rcp14_ps(d));
}

// One piece of gate_silu_'s bfloat16 stream: x = silu(x * factors) for len elements.
void gate_silu_piece_bf16(c10::BFloat16* piece, const float* factors, int64_t len) {
  using IO = Io<c10::BFloat16>;
  for (int64_t j = 0; j < len; j += 16) {
    const int64_t count = std::min<int64_t>(16, len - j);
    const __m512 z = _mm512_mul_ps(IO::load(piece + j, count), _mm512_maskz_loadu_ps(IO::mask(count), factors + j));
    IO::store(piece + j, at::vec::Vectorized<float>(silu_for_bf16(z)), count);
  }
}

#if defined(__GNUC__)
// The same with the CPU's bfloat16 conversion (AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake and Sapphire
// Rapids and later), called where the CPU has it: vcvtneps2bf16 rounds to nearest even as the integer sequence does
// (it reads float32 denormals, below 1.2e-38, as zero).
#pragma GCC push_options
#pragma GCC target("avx512bf16")
void gate_silu_piece_bf16_native(c10::BFloat16* piece, const float* factors, int64_t len) {
  using IO = Io<c10::BFloat16>;
  for (int64_t j = 0; j < len; j += 16) {
    const int64_t count = std::min<int64_t>(16, len - j);
    const __mmask16 m = IO::mask(count);
    const __m512 z = _mm512_mul_ps(IO::load(piece + j, count), _mm512_maskz_loadu_ps(m, factors + j));
    _mm256_mask_storeu_epi16(piece + j, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(silu_for_bf16(z))));
  }
}
#pragma GCC pop_options
#endif

// gate_silu_piece_bf16_native where the CPU has AVX512-BF16 (and EPAMX_DISABLE_AVX512_BF16 is unset or 0: the tests
// run the other path that way), else gate_silu_piece_bf16.
using PieceBf16 = void (*)(c10::BFloat16*, const float*, int64_t);
PieceBf16 gate_silu_piece_bf16_for_this_cpu() {
#if defined(__GNUC__)
  static const PieceBf16 fn = [] {
    const char* off = std::getenv("EPAMX_DISABLE_AVX512_BF16");
    const bool native = __builtin_cpu_supports("avx512bf16") && !(off != nullptr && std::string(off) != "0");
    return native ? gate_silu_piece_bf16_native : gate_silu_piece_bf16;
  }();
  return fn;
#else
  return gate_silu_piece_bf16;
#endif
}
#endif

}  // namespace

template <typename scalar_t>
void channel_sums_kernel(const SqueezeGeometry& g, const scalar_t* x, at::opmath_type<scalar_t>* partial) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = IO::kWidth;
  const int64_t blocks = (g.S + kSumBlock - 1) / kSumBlock;
  if (g.channels_last) {
    at::parallel_for(0, g.N * blocks, grain_for(kSumBlock * g.C), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, s0 = task % blocks * kSumBlock, s1 = std::min(g.S, s0 + kSumBlock);
        const scalar_t* xn = x + n * g.S * g.C;
        acc_t* out = partial + task * g.C;
        for (int64_t c = 0; c < g.C; c += W) {
          const int64_t count = std::min(W, g.C - c);
          Vec a(0), b(0);  // two chains: even and odd pixels
          int64_t s = s0;
          for (; s + 1 < s1; s += 2) {
            a += IO::load(xn + s * g.C + c, count);
            b += IO::load(xn + (s + 1) * g.C + c, count);
          }
          if (s < s1) a += IO::load(xn + s * g.C + c, count);
          (a + b).store(out + c, count);
        }
      }
    });
  } else {
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.C, c = row % g.C;
        const scalar_t* xr = x + row * g.S;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t s0 = b * kSumBlock, s1 = std::min(g.S, s0 + kSumBlock);
          Vec a(0);
          for (int64_t s = s0; s < s1; s += W) a += IO::load(xr + s, std::min(W, s1 - s));
          partial[(n * blocks + b) * g.C + c] = sum_lanes(a);
        }
      }
    });
  }
}

template <typename scalar_t>
void gate_silu_kernel(const SqueezeGeometry& g, scalar_t* x, const at::opmath_type<scalar_t>* gate) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = IO::kWidth;
  if (g.channels_last) {
    // A sample's pixels are one stream of S * C elements whose factors repeat every C: the stream is cut into
    // pieces of `period` = lcm(C, W) elements, each multiplied by the same `period` factors, whole vectors (a
    // vector per pixel's channels would leave C % W lanes idle at every pixel).
    const int64_t period = std::lcm(g.C, W), per_sample = g.S * g.C;
    const int64_t pieces = (per_sample + period - 1) / period;
#if defined(CPU_CAPABILITY_AVX512)
    const PieceBf16 piece_bf16 = gate_silu_piece_bf16_for_this_cpu();
#endif
    at::parallel_for(0, g.N * pieces, grain_for(period), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> factors(static_cast<size_t>(period));
      int64_t sample = -1;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / pieces, k0 = task % pieces * period;
        if (n != sample) {
          for (int64_t k = 0; k < period; ++k) factors[k] = gate[n * g.C + k % g.C];
          sample = n;
        }
        scalar_t* piece = x + n * per_sample + k0;
        const int64_t len = std::min(period, per_sample - k0);
        int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          piece_bf16(piece, factors.data(), len);
          continue;
        }
#endif
        for (; k + W <= len; k += W) IO::store(piece + k, silu(IO::load(piece + k, W) * Vec::loadu(&factors[k])), W);
        if (k < len) {
          IO::store(piece + k, silu(IO::load(piece + k, len - k) * Vec::loadu(&factors[k], len - k)), len - k);
        }
      }
    });
  } else {
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xr = x + r * g.S;
        const Vec factor(gate[r]);
        for (int64_t s = 0; s < g.S; s += W) {
          const int64_t count = std::min(W, g.S - s);
          IO::store(xr + s, silu(IO::load(xr + s, count) * factor), count);
        }
      }
    });
  }
}

#define EPAMX_INSTANTIATE(scalar_t)                                                                              \
  template void channel_sums_kernel<scalar_t>(const SqueezeGeometry&, const scalar_t*, at::opmath_type<scalar_t>*); \
  template void gate_silu_kernel<scalar_t>(const SqueezeGeometry&, scalar_t*, const at::opmath_type<scalar_t>*);
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE)
#undef EPAMX_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace epamx
