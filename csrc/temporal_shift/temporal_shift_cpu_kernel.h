#pragma once
// The temporal shift's out-of-place channels-last frame assembly, the vectorised CPU kernel's interface (built once
// per instruction set: common/cpu_isa.h).
#include <cstdint>

#include "common/cpu_isa.h"

namespace epamx {

// Frames [f0, f1) of the out-of-place shift of x, dense [N * T frames, P pixels, C channels] in channels-last
// memory: each output row's channels [0, fold) from the same pixel of the frame shift_source_frame names for them,
// [fold, 2 * fold) likewise, the rest from the same frame (zeros where the source frame is outside the clip).
// bits_t: the dtype's bits (2, 4 or 8 bytes); the output is a bit-exact copy of its sources.
EPAMX_DECLARE_CPU_KERNELS(
    template <typename bits_t> void shift_frames_channels_last(const bits_t* x, bits_t* out, int64_t T, int64_t P,
                                                               int64_t C, int64_t fold, int sign, int64_t f0,
                                                               int64_t f1);)

}  // namespace epamx
