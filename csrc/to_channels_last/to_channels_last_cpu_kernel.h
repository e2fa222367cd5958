#pragma once
// A clip's conversion to channels-last memory with a dtype cast, the vectorised CPU kernel's interface (built once
// per instruction set: common/cpu_isa.h).
#include <cstdint>

#include "common/cpu_isa.h"

namespace epamx {

// out (N, S, C) = x (N, C, S) transposed, each element cast to out_t (rounded to nearest even).
EPAMX_DECLARE_CPU_KERNELS(
    template <typename in_t, typename out_t> void transpose_cast_kernel(const in_t* x, out_t* out, int64_t N,
                                                                        int64_t C, int64_t S);)

}  // namespace epamx
