#pragma once
// The CUDA emulator's stand-in (tools/cuda_emu/prelude.h): launches run at once, in order, so there is one stream.
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
