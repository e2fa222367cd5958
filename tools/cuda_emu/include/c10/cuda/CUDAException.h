#pragma once
// The CUDA emulator's stand-in (tools/cuda_emu/prelude.h): a launch that fails throws from the launch itself.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() static_cast<void>(0)
