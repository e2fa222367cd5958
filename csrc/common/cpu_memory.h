#pragma once
// Output allocation for CPU kernels that write every element of a new tensor.
#include <ATen/core/Tensor.h>

namespace epamx {

// at::empty, plus: a large CPU buffer is advised onto transparent huge pages before anything touches it.
// The first write to a fresh multi-megabyte allocation is dominated by the kernel's 4 KiB page faults; with
// 2 MiB pages it costs about half (measured on the 2-core machines: a 231 MB empty+copy 53 ms -> 28 ms).
// The advice only concerns memory this tensor owns; where THP is off, it is a no-op.
at::Tensor empty_for_overwrite(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace epamx
