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
// silu for a bfloat16 result (8 significant bits), in 10 vector operations: exp(-z) = 2^t with t = -z log2(e),
// n = round(t) and 2^(t - n), t - n in [-1/2, 1/2], by a degree-3 polynomial fitted for the least relative error
// (7.5e-5), 2^n by scalef; then the 14-bit reciprocal estimate of 1 + exp(-z) (6e-5). Within 1.3e-4 of
// z * sigmoid(z) against bfloat16's own rounding of 2e-3. rcp14(inf) = 0 gives z < -88.7 -> -0 and z = -inf -> NaN,
// as F.silu.
inline __m512 silu_for_bf16(__m512 z) {
  const __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(-1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.05517132207751274f), f, _mm512_set1_ps(0.24261054396629333f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932609677314758f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999281167984009f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(z, _mm512_rcp14_ps(d));
}

inline __m512 load_bf16(const c10::BFloat16* p) {
  return bfloat16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// x = silu(x * factors) for len elements of a bfloat16 stream (x = silu(x) where factors is null), with Round
// turning 16 floats into 16 bfloat16: two whole vectors per step (unmasked: a mask per vector cost a quarter of
// the pass), then the rest under a mask.
template <typename Round>
inline void silu_stream_bf16(c10::BFloat16* x, const float* factors, int64_t len, Round round) {
  auto z_at = [&](int64_t j) {
    const __m512 v = load_bf16(x + j);
    return factors != nullptr ? _mm512_mul_ps(v, _mm512_loadu_ps(factors + j)) : v;
  };
  auto store = [&](int64_t j, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + j), round(v));
  };
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m512 a = z_at(j), b = z_at(j + 16);
    store(j, silu_for_bf16(a));
    store(j + 16, silu_for_bf16(b));
  }
  for (; j < len; j += 16) {
    const int64_t count = std::min<int64_t>(16, len - j);
    if (count == 16) {
      store(j, silu_for_bf16(z_at(j)));
      continue;
    }
    using IO = Io<c10::BFloat16>;
    const __mmask16 m = IO::mask(count);
    __m512 z = IO::load(x + j, count);
    if (factors != nullptr) z = _mm512_mul_ps(z, _mm512_maskz_loadu_ps(m, factors + j));
    _mm256_mask_storeu_epi16(x + j, m, round(silu_for_bf16(z)));
  }
}

void silu_stream_bf16_integer(c10::BFloat16* x, const float* factors, int64_t len) {
  silu_stream_bf16(x, factors, len, [](__m512 v) { return float_to_bfloat16(v); });
}

#if defined(__GNUC__)
// The same with the CPU's bfloat16 conversion (AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake and Sapphire
// Rapids and later), called where the CPU has it: vcvtneps2bf16 rounds to nearest even as the integer sequence does
// (it reads float32 denormals, below 1.2e-38, as zero).
#pragma GCC push_options
#pragma GCC target("avx512bf16")
void silu_stream_bf16_native(c10::BFloat16* x, const float* factors, int64_t len) {
  silu_stream_bf16(x, factors, len, [](__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); });
}
#pragma GCC pop_options
#endif

// silu_stream_bf16_native where the CPU has AVX512-BF16 (and EPAMX_DISABLE_AVX512_BF16 is unset or 0: the tests
// run the other path that way), else silu_stream_bf16_integer.
using StreamBf16 = void (*)(c10::BFloat16*, const float*, int64_t);
StreamBf16 silu_stream_bf16_for_this_cpu() {
#if defined(__GNUC__)
  static const StreamBf16 fn = [] {
    const char* off = std::getenv("EPAMX_DISABLE_AVX512_BF16");
    const bool native = __builtin_cpu_supports("avx512bf16") && !(off != nullptr && std::string(off) != "0");
    return native ? silu_stream_bf16_native : silu_stream_bf16_integer;
  }();
  return fn;
#else
  return silu_stream_bf16_integer;
#endif
}
#endif

// x = silu(x * factors) for len elements (x = silu(x) where factors is null).
template <typename scalar_t>
void silu_stream(scalar_t* x, const at::opmath_type<scalar_t>* factors, int64_t len) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    silu_stream_bf16_for_this_cpu()(x, factors, len);
    return;
  }
#endif
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  int64_t k = 0;
  if (factors != nullptr) {
    for (; k + W <= len; k += W) IO::store(x + k, silu(IO::load(x + k, W) * Vec::loadu(factors + k)), W);
  } else {
    for (; k + W <= len; k += W) IO::store(x + k, silu(IO::load(x + k, W)), W);
  }
  if (k < len) {
    const int64_t count = len - k;
    const Vec z = IO::load(x + k, count);
    IO::store(x + k, silu(factors != nullptr ? z * Vec::loadu(factors + k, count) : z), count);
  }
}

// Elements per task of gate_silu_kernel without a gate, and about the length of the repeating factors with one.
constexpr int64_t kSiluChunk = 4096;
constexpr int64_t kFactorSpan = 1024;

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
  if (gate == nullptr) {
    // x = silu(x), whatever the layout: one stream of N * C * S elements, in chunks.
    const int64_t total = g.N * g.C * g.S, chunks = (total + kSiluChunk - 1) / kSiluChunk;
    at::parallel_for(0, chunks, grain_for(kSiluChunk), [&](int64_t begin, int64_t end) {
      const int64_t k0 = begin * kSiluChunk;
      silu_stream(x + k0, static_cast<const acc_t*>(nullptr), std::min(total, end * kSiluChunk) - k0);
    });
  } else if (g.channels_last) {
    // A sample's pixels are one stream of S * C elements whose factors repeat every C: the stream is cut into
    // pieces of `span` elements, a multiple of lcm(C, W) (whole vectors: a vector per pixel's channels would leave
    // C % W lanes idle at every pixel) of about kFactorSpan, each multiplied by the same `span` factors.
    const int64_t period = std::lcm(g.C, W), span = period * std::max<int64_t>(1, kFactorSpan / period);
    const int64_t per_sample = g.S * g.C, pieces = (per_sample + span - 1) / span;
    at::parallel_for(0, g.N * pieces, grain_for(span), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> factors(static_cast<size_t>(span));
      int64_t sample = -1;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / pieces, k0 = task % pieces * span;
        if (n != sample) {
          for (int64_t k = 0; k < span; ++k) factors[k] = gate[n * g.C + k % g.C];
          sample = n;
        }
        silu_stream(x + n * per_sample + k0, factors.data(), std::min(span, per_sample - k0));
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
