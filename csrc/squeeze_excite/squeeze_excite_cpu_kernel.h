#pragma once
// Squeeze-and-excitation's passes in inference, the vectorised CPU kernels' interface (built once per instruction
// set: common/cpu_isa.h).
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/cpu_isa.h"

namespace epamx {

// x is a dense (N, C, S) tensor, or (N, S, C) when channels_last.
struct SqueezeGeometry {
  int64_t N, C, S;
  bool channels_last;
};

// Pixels (channels-last) or elements (contiguous) per partial sum of channel_sums_kernel: a fixed split, so the
// sums are grouped the same way whatever the thread count.
constexpr int64_t kSumBlock = 256;

// channel_sums_kernel: partial[(n * blocks + b) * C + c] = the sum of x[n, c, s] over block b of s (kSumBlock
// values; blocks = ceil(S / kSumBlock)), in acc_t; every partial row is written.
// gate_silu_kernel: x[n, c, s] = silu(x[n, c, s] * gate[n, c]) in place, gate dense (N, C) in acc_t, or
// x = silu(x) where gate is null.
EPAMX_DECLARE_CPU_KERNELS(
    template <typename scalar_t> void channel_sums_kernel(const SqueezeGeometry& g, const scalar_t* x,
                                                          at::opmath_type<scalar_t>* partial);
    template <typename scalar_t> void gate_silu_kernel(const SqueezeGeometry& g, scalar_t* x,
                                                       const at::opmath_type<scalar_t>* gate);)

}  // namespace epamx
