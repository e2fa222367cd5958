#pragma once
// The memory format of the fused ops' results.
#include <ATen/core/Tensor.h>

namespace epamx {

// `result`, computed contiguous (as the GPU kernels compute), in `format` with the strides at::empty gives it: the
// strides the CPU kernels and the fake kernels in epamx/ops give their results too, size-1 dims included.
inline at::Tensor in_memory_format(const at::Tensor& result, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous) return result;
  return at::empty(result.sizes(), result.options().memory_format(format)).copy_(result);
}

}  // namespace epamx
