// Squeeze-and-excitation's passes in inference on the CPU: argument checks, layouts and outputs here; the
// vectorised loops are in squeeze_excite_cpu_kernel.cpp. CPU only (the models compute these with ATen elsewhere).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "batch_norm_act/batch_norm_act.h"
#include "squeeze_excite/squeeze_excite_cpu_kernel.h"

namespace epamx {
namespace {

SqueezeGeometry squeeze_geometry(const at::Tensor& x, bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, N * C == 0 ? 0 : x.numel() / (N * C), channels_last};
}

at::Tensor channel_sums_cpu(const at::Tensor& x_in) {
  constexpr const char* op = "channel_sums";
  check_affine_input(x_in, op);
  const at::Tensor x = affine_input(x_in);
  const SqueezeGeometry g = squeeze_geometry(x, affine_channels_last(x));
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  // Empty positions sum to zero; otherwise every element is written below.
  if (g.N * g.C * g.S == 0) return at::zeros({g.N, g.C}, options);
  at::Tensor out = at::empty({g.N, g.C}, options);
  const int64_t blocks = (g.S + kSumBlock - 1) / kSumBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(static_cast<size_t>(g.N * blocks * g.C));
    EPAMX_CPU_KERNEL_CALL(channel_sums_kernel<scalar_t>, g, x.const_data_ptr<scalar_t>(), partial.data());
    // The blocks' sums added in order, in double: the same result for any thread count.
    acc_t* o = out.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        double total = 0;
        for (int64_t b = 0; b < blocks; ++b) total += static_cast<double>(partial[(n * blocks + b) * g.C + c]);
        o[n * g.C + c] = static_cast<acc_t>(total);
      }
    }
  });
  return out;
}

void gate_silu_cpu_(const at::Tensor& x, const std::optional<at::Tensor>& gate_in) {
  constexpr const char* op = "gate_silu_";
  check_affine_input(x, op);
  if (gate_in) check_coefficient(*gate_in, x, op, "gate");
  if (x.numel() == 0) return;
  // The kernels work on dense channels-last or contiguous memory; any other x is gated in a copy written back.
  const at::Tensor work = affine_input(x);
  const at::Tensor gate = gate_in ? gate_in->contiguous() : at::Tensor();
  const SqueezeGeometry g = squeeze_geometry(work, affine_channels_last(work));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), op, [&] {
    EPAMX_CPU_KERNEL_CALL(gate_silu_kernel<scalar_t>, g, work.mutable_data_ptr<scalar_t>(),
                          gate.defined() ? gate.const_data_ptr<at::opmath_type<scalar_t>>() : nullptr);
  });
  if (!work.is_same(x)) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CPU, m) {
  m.impl("channel_sums", &channel_sums_cpu);
  m.impl("gate_silu_", &gate_silu_cpu_);
}

}  // namespace epamx
