#pragma once
// Elementary functions as plain float arithmetic, shared by the CPU and CUDA kernels: loops that call them
// vectorise on the CPU (a call to expf does not), and the GPU evaluates the same formula.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace epamx {

// 2^i for i in [-126, 127], from its bit pattern.
HOST_DEVICE_INLINE float exp2_int(int32_t i) {
  const int32_t bits = (i + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// exp(x) in float32 for x <= 0: within 1.22 ulp of exp (checked against double exp for every float32 in
// [-87, 0]), and 0 below -87, where exp < 1.7e-38 (subnormal from -87.34). Branch-free plain arithmetic rather
// than expf, so the CPU loop over a window row vectorises and the GPU evaluates the same formula (nvcc may fuse
// its multiply-adds, so GPU results can differ from the CPU's in the last bits).
HOST_DEVICE_INLINE float exp_nonpositive(float x) {
  // Clamping first keeps the integer conversion in range for -inf and NaN, which map to 0 below.
  const float xc = x >= -88.0f ? x : -88.0f;
  // x = k ln2 + r with k an integer and |r| <= ln2 / 2; k by the round-to-nearest trick of adding 1.5 * 2^23.
  constexpr float kRound = 12582912.0f;
  const float k = (xc * 1.44269504088896341f + kRound) - kRound;
  // ln2 split into a part with few mantissa bits (so k * hi is exact) and the rest.
  const float r = (xc - k * 0.693145751953125f) - k * 1.42860682030941723e-06f;
  // exp(r) by its Taylor series to r^7 (truncation error below 5e-9 relative for |r| <= ln2 / 2).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return x >= -87.0f ? p * exp2_int(static_cast<int32_t>(k)) : 0.0f;
}

// The logistic sigmoid 1 / (1 + exp(-z)) in float32 through exp_nonpositive(-|z|), so it never overflows:
// 0 for z <= -87.3 (and for NaN), 1 once exp(-z) is below half an ulp of 1.
HOST_DEVICE_INLINE float sigmoid_of(float z) {
  const float e = exp_nonpositive(z >= 0.0f ? -z : z);
  const float r = 1.0f / (1.0f + e);
  return z >= 0.0f ? r : e * r;
}

HOST_DEVICE_INLINE double sigmoid_of(double z) {
#if defined(__CUDA_ARCH__)
  return 1.0 / (1.0 + ::exp(-z));
#else
  return 1.0 / (1.0 + std::exp(-z));
#endif
}

}  // namespace epamx
