#pragma once
// Qualifiers for code shared between the CPU kernels and the CUDA kernels.

#if defined(__CUDACC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif
