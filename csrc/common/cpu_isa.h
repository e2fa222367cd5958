#pragma once
// CPU kernels built once per x86 instruction set, as ATen builds its own (ATen/native/cpu): CMake compiles every
// *_cpu_kernel.cpp three times, with CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512 and the matching -m flags, so
// at::vec::Vectorized has the width of that instruction set. Each build defines its kernels in namespace
// epamx::<CPU_CAPABILITY>; the front ends (<op>_cpu.cpp) call the build for the instruction set torch itself chose
// for this CPU (ATEN_CPU_CAPABILITY=default or avx2 lowers it, as the tests do to run every build).
//
// What a kernel file and the rest share (inline functions, templates) exists in several builds; CMake links the
// objects built without -m flags first, so the linker keeps their copy, which every CPU can run.
#include <string>

namespace epamx {

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

// The instruction set of the kernels the front ends call, decided once.
CpuIsa cpu_isa();
std::string cpu_isa_name();

}  // namespace epamx

// Applies macro M to each floating dtype the CPU kernels are instantiated for (the kernel files' explicit
// instantiations).
#define EPAMX_FOR_EACH_FLOATING_TYPE(M) M(float) M(double) M(c10::Half) M(c10::BFloat16)

// Declares the same kernel templates in every build's namespace.
#if defined(EPAMX_CPU_ISA_X86)
#define EPAMX_DECLARE_CPU_KERNELS(...)  \
  namespace DEFAULT {                   \
  __VA_ARGS__                           \
  }                                     \
  namespace AVX2 {                      \
  __VA_ARGS__                           \
  }                                     \
  namespace AVX512 {                    \
  __VA_ARGS__                           \
  }
// Calls kernel `fn` (with its template arguments) of the build cpu_isa() chose.
#define EPAMX_CPU_KERNEL_CALL(fn, ...)                          \
  do {                                                          \
    switch (::epamx::cpu_isa()) {                               \
      case ::epamx::CpuIsa::kAvx512: AVX512::fn(__VA_ARGS__); break; \
      case ::epamx::CpuIsa::kAvx2: AVX2::fn(__VA_ARGS__); break;     \
      default: DEFAULT::fn(__VA_ARGS__); break;                 \
    }                                                           \
  } while (false)
#else
#define EPAMX_DECLARE_CPU_KERNELS(...) \
  namespace DEFAULT {                  \
  __VA_ARGS__                          \
  }
#define EPAMX_CPU_KERNEL_CALL(fn, ...) DEFAULT::fn(__VA_ARGS__)
#endif
