#include "common/cpu_isa.h"

#include <ATen/Version.h>

namespace epamx {
namespace {

CpuIsa pick_cpu_isa() {
#if defined(EPAMX_CPU_ISA_X86)
  // torch's choice: what this CPU supports, capped by ATEN_CPU_CAPABILITY.
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return CpuIsa::kAvx512;
  if (capability == "AVX2") return CpuIsa::kAvx2;
#endif
  return CpuIsa::kDefault;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = pick_cpu_isa();
  return isa;
}

std::string cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return "AVX512";
    case CpuIsa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace epamx
