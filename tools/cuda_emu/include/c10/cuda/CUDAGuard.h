#pragma once
// The CUDA emulator's stand-in (tools/cuda_emu/prelude.h): one device, the CPU, so a guard has nothing to switch.
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
