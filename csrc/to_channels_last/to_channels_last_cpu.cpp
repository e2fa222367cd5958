// A clip's conversion to channels-last memory (and optionally to another floating dtype) in one pass, CPU: the
// models' input conversion. ATen's copy into a channels-last tensor walks the output with the input's strides
// and ran 4-12x slower than a plain copy on EPAM-Net's clips (3 or 17 channels).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "common/cpu_memory.h"
#include "to_channels_last/to_channels_last_cpu_kernel.h"

namespace epamx {
namespace {

at::Tensor to_channels_last_cpu(const at::Tensor& x, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "to_channels_last";
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 5, op, ": x must be 4-D (N, C, H, W) or 5-D (N, C, T, H, W), got shape ",
                    x.sizes());
  const at::ScalarType out_type = dtype.value_or(x.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(out_type), op, ": dtype must be a floating dtype, got ", out_type);
  const auto format = x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  // Already in that layout, or not dense contiguous: ATen's conversion (a cast, or a general strided copy).
  if (!x.is_contiguous() || x.is_contiguous(format) || x.numel() == 0) {
    return x.to(x.options().dtype(out_type).memory_format(format), /*non_blocking=*/false, /*copy=*/true);
  }
  at::Tensor out = empty_for_overwrite(x.sizes(), x.options().dtype(out_type).memory_format(format));
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, op, [&] {
      EPAMX_CPU_KERNEL_CALL(transpose_cast_kernel, x.const_data_ptr<in_t>(), out.mutable_data_ptr<scalar_t>(), N, C, S);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CPU, m) { m.impl("to_channels_last", &to_channels_last_cpu); }

}  // namespace epamx
