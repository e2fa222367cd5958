// A clip's conversion to channels-last memory with a dtype cast, vectorised (compiled once per instruction set).
#include "to_channels_last/to_channels_last_cpu_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"

namespace epamx {
namespace CPU_CAPABILITY {
namespace {

// Positions per task: kPositions positions of every channel (kPositions x C elements, in L1/L2).
constexpr int64_t kPositions = 256;

// dst[0, n) = src[0, n) cast to out_t; float -> bfloat16 in registers where AVX-512 is built (float_to_bfloat16,
// the same rounding as c10::BFloat16).
template <typename in_t, typename out_t>
void cast_run(const in_t* src, out_t* dst, int64_t n) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, c10::BFloat16>) {
    for (; k + 16 <= n; k += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), float_to_bfloat16(_mm512_loadu_ps(src + k)));
    }
  }
#endif
  for (; k < n; ++k) dst[k] = static_cast<out_t>(src[k]);
}

// dst[3 * s + c] = src[c * plane + s] for s < len, c < 3: an RGB clip's planes interleaved.
template <typename T>
void interleave3(const T* src, int64_t plane, T* dst, int64_t len) {
  for (int64_t s = 0; s < len; ++s) {
    dst[3 * s] = src[s];
    dst[3 * s + 1] = src[plane + s];
    dst[3 * s + 2] = src[2 * plane + s];
  }
}

}  // namespace

template <typename in_t, typename out_t>
void transpose_cast_kernel(const in_t* x, out_t* out, int64_t N, int64_t C, int64_t S) {
  const int64_t blocks = (S + kPositions - 1) / kPositions;
  at::parallel_for(0, N * blocks, grain_for(kPositions * C), [&](int64_t begin, int64_t end) {
    std::vector<out_t> stage(C == 3 ? 0 : static_cast<size_t>(kPositions * C));
    std::vector<in_t> rgb(std::is_same_v<in_t, out_t> || C != 3 ? 0 : static_cast<size_t>(kPositions * 3));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, s0 = task % blocks * kPositions, len = std::min(kPositions, S - s0);
      const in_t* src = x + n * C * S + s0;
      out_t* dst = out + (n * S + s0) * C;
      if (C == 3) {
        // Three planes interleaved straight from the input (with a cast: in the input's dtype, then cast as one
        // run of whole vectors): 1.7-3x faster than through per-channel runs for 2-byte outputs.
        if constexpr (std::is_same_v<in_t, out_t>) {
          interleave3(src, S, dst, len);
        } else {
          interleave3(src, S, rgb.data(), len);
          cast_run(rgb.data(), dst, 3 * len);
        }
        continue;
      }
      // More channels (the pose stream's 17 heatmaps): each channel's run cast into a staging block first
      // (vectorised, one input stream at a time), then interleaved from there.
      for (int64_t c = 0; c < C; ++c) cast_run(src + c * S, stage.data() + c * kPositions, len);
      for (int64_t s = 0; s < len; ++s) {
        for (int64_t c = 0; c < C; ++c) dst[s * C + c] = stage[c * kPositions + s];
      }
    }
  });
}

#define EPAMX_INSTANTIATE_OUT(in_t, out_t) \
  template void transpose_cast_kernel<in_t, out_t>(const in_t*, out_t*, int64_t, int64_t, int64_t);
#define EPAMX_INSTANTIATE_FROM_FLOAT(out_t) EPAMX_INSTANTIATE_OUT(float, out_t)
#define EPAMX_INSTANTIATE_FROM_DOUBLE(out_t) EPAMX_INSTANTIATE_OUT(double, out_t)
#define EPAMX_INSTANTIATE_FROM_HALF(out_t) EPAMX_INSTANTIATE_OUT(c10::Half, out_t)
#define EPAMX_INSTANTIATE_FROM_BFLOAT16(out_t) EPAMX_INSTANTIATE_OUT(c10::BFloat16, out_t)
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE_FROM_FLOAT)
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE_FROM_DOUBLE)
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE_FROM_HALF)
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE_FROM_BFLOAT16)
#undef EPAMX_INSTANTIATE_FROM_FLOAT
#undef EPAMX_INSTANTIATE_FROM_DOUBLE
#undef EPAMX_INSTANTIATE_FROM_HALF
#undef EPAMX_INSTANTIATE_FROM_BFLOAT16
#undef EPAMX_INSTANTIATE_OUT

}  // namespace CPU_CAPABILITY
}  // namespace epamx
