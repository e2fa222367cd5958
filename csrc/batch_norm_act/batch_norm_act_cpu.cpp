// Batch norm + activation on the CPU: argument checks, memory formats and outputs here; the vectorised loops are in
// batch_norm_act_cpu_kernel.cpp. Also the test hook that runs the CUDA kernels' per-thread bodies.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "batch_norm_act/batch_norm_act.h"
#include "batch_norm_act/batch_norm_act_cpu_kernel.h"
#include "common/cpu_memory.h"

namespace epamx {
namespace {

// The kernels' arguments for operands `in`; outputs and the backward op's coefficients are the caller's to set.
template <typename scalar_t>
AffineCpuArgs<scalar_t> affine_cpu_args(const AffineOperands& in, int64_t act) {
  using acc_t = at::opmath_type<scalar_t>;
  AffineCpuArgs<scalar_t> args{};
  args.g = affine_geometry<int64_t>(in.x, in.channels_last);
  args.act = act;
  args.x = in.x.const_data_ptr<scalar_t>();
  if (in.grad.defined()) args.grad = in.grad.const_data_ptr<scalar_t>();
  if (in.scale.defined()) args.scale = in.scale.const_data_ptr<acc_t>();
  if (in.shift.defined()) args.shift = in.shift.const_data_ptr<acc_t>();
  return args;
}

// The (N, C) float64 row sums the reductions write (every element).
std::tuple<at::Tensor, at::Tensor> row_sum_outputs(const at::Tensor& x) {
  const auto options = x.options().dtype(at::kDouble);
  return {at::empty({x.size(0), x.size(1)}, options), at::empty({x.size(0), x.size(1)}, options)};
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& x_in) {
  constexpr const char* op = "_channel_moments";
  check_affine_input(x_in, op);
  const AffineOperands in = affine_operands(x_in, nullptr, {}, {});
  auto [s1, s2] = row_sum_outputs(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
    auto args = affine_cpu_args<scalar_t>(in, 0);
    args.sum1 = s1.mutable_data_ptr<double>();
    args.sum2 = s2.mutable_data_ptr<double>();
    EPAMX_CPU_KERNEL_CALL(channel_moments_kernel<scalar_t>, args);
  });
  return {s1, s2};
}

at::Tensor affine_act_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                          int64_t act) {
  constexpr const char* op = "affine_act";
  check_affine_args(x_in, nullptr, scale_in, shift_in, op);
  check_activation(act, op);
  const AffineOperands in = affine_operands(x_in, nullptr, scale_in, shift_in);
  at::Tensor out = empty_for_overwrite(in.x.sizes(), in.output_options());
  if (in.x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
    auto args = affine_cpu_args<scalar_t>(in, act);
    args.out = out.mutable_data_ptr<scalar_t>();
    EPAMX_CPU_KERNEL_CALL(affine_act_kernel<scalar_t>, args);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_act_backward_reduce_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& scale_in,
                                                                  const at::Tensor& shift_in, int64_t act) {
  constexpr const char* op = "_affine_act_backward_reduce";
  check_affine_args(x_in, &grad_in, scale_in, shift_in, op);
  check_activation(act, op);
  const AffineOperands in = affine_operands(x_in, &grad_in, scale_in, shift_in);
  auto [s1, s2] = row_sum_outputs(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
    auto args = affine_cpu_args<scalar_t>(in, act);
    args.sum1 = s1.mutable_data_ptr<double>();
    args.sum2 = s2.mutable_data_ptr<double>();
    EPAMX_CPU_KERNEL_CALL(affine_act_backward_reduce_kernel<scalar_t>, args);
  });
  return {s1, s2};
}

at::Tensor affine_act_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale_in,
                                   const at::Tensor& shift_in, const at::Tensor& coef_u_in,
                                   const at::Tensor& coef_x_in, const at::Tensor& coef_1_in, int64_t act) {
  constexpr const char* op = "_affine_act_backward";
  check_affine_args(x_in, &grad_in, scale_in, shift_in, op);
  check_coefficient(coef_u_in, x_in, op, "coef_u");
  check_coefficient(coef_x_in, x_in, op, "coef_x");
  check_coefficient(coef_1_in, x_in, op, "coef_1");
  check_activation(act, op);
  const AffineOperands in = affine_operands(x_in, &grad_in, scale_in, shift_in);
  const at::Tensor cu = coef_u_in.contiguous(), cx = coef_x_in.contiguous(), c1 = coef_1_in.contiguous();
  at::Tensor dx = empty_for_overwrite(in.x.sizes(), in.output_options());
  if (in.x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto args = affine_cpu_args<scalar_t>(in, act);
    args.coef_u = cu.const_data_ptr<acc_t>();
    args.coef_x = cx.const_data_ptr<acc_t>();
    args.coef_1 = c1.const_data_ptr<acc_t>();
    args.out = dx.mutable_data_ptr<scalar_t>();
    EPAMX_CPU_KERNEL_CALL(affine_act_backward_kernel<scalar_t>, args);
  });
  return dx;
}

}  // namespace

std::vector<at::Tensor> batch_norm_act_run_thread_bodies(int64_t kind, const at::Tensor& x_in,
                                                         const std::optional<at::Tensor>& grad_in,
                                                         const std::optional<at::Tensor>& scale,
                                                         const std::optional<at::Tensor>& shift,
                                                         const std::optional<at::Tensor>& coef_u,
                                                         const std::optional<at::Tensor>& coef_x,
                                                         const std::optional<at::Tensor>& coef_1, int64_t act,
                                                         const at::Tensor& order_in) {
  constexpr const char* op = "batch_norm_act_run_thread_bodies";
  check_affine_input(x_in, op);
  check_device_type(x_in, c10::DeviceType::CPU, op, "x");
  check_activation(act, op);
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, op, ": kind must be 0..3, got ", kind);
  if (grad_in) check_affine_grad(*grad_in, x_in, op);  // before grad is put in x's layout
  const AffineOperands in = affine_operands(x_in, grad_in ? &*grad_in : nullptr, {}, {});
  const at::Tensor &x = in.x, &grad = in.grad;
  const auto g = affine_geometry<int64_t>(x, in.channels_last);
  const bool per_row = kind == 0 || kind == 2;
  const int64_t threads = per_row ? g.N * g.C : x.numel();
  const at::Tensor order = order_in.to(at::kLong).contiguous();
  TORCH_CHECK_VALUE(order.numel() == threads, op, ": order must list all ", threads, " thread indices, got ",
                    order.numel());
  TORCH_CHECK_VALUE(kind < 2 || grad_in.has_value(), op, ": kind ", kind, " needs grad");
  std::vector<at::Tensor> out;
  if (per_row) {
    const auto [sum1, sum2] = row_sum_outputs(x);
    out = {sum1, sum2};
  } else {
    out = {at::empty(x.sizes(), in.output_options())};
  }
  const int64_t* idx = order.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto coef = [&](const std::optional<at::Tensor>& t, const char* name) -> const acc_t* {
      TORCH_CHECK_VALUE(t.has_value(), op, ": kind ", kind, " needs ", name);
      check_coefficient(*t, x, op, name);
      TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, " must be contiguous");
      return t->const_data_ptr<acc_t>();
    };
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_activation(act, [&]<Activation A>() {
      for (int64_t j = 0; j < threads; ++j) {
        const int64_t i = idx[j];
        TORCH_CHECK_VALUE(i >= 0 && i < threads, op, ": thread index ", i, " out of range");
        if (kind == 0) {
          moments_thread<scalar_t, int64_t>(i, g, xp, out[0].mutable_data_ptr<double>(),
                                            out[1].mutable_data_ptr<double>());
        } else if (kind == 1) {
          affine_act_thread<A, scalar_t, acc_t, int64_t>(i, g, xp, coef(scale, "scale"), coef(shift, "shift"),
                                                         out[0].mutable_data_ptr<scalar_t>());
        } else if (kind == 2) {
          backward_reduce_thread<A, scalar_t, acc_t, int64_t>(
              i, g, grad.const_data_ptr<scalar_t>(), xp, coef(scale, "scale"), coef(shift, "shift"),
              out[0].mutable_data_ptr<double>(), out[1].mutable_data_ptr<double>());
        } else {
          backward_thread<A, scalar_t, acc_t, int64_t>(i, g, grad.const_data_ptr<scalar_t>(), xp, coef(scale, "scale"),
                                                       coef(shift, "shift"), coef(coef_u, "coef_u"),
                                                       coef(coef_x, "coef_x"), coef(coef_1, "coef_1"),
                                                       out[0].mutable_data_ptr<scalar_t>());
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(epamx, CPU, m) {
  m.impl("_channel_moments", &channel_moments_cpu);
  m.impl("affine_act", &affine_act_cpu);
  m.impl("_affine_act_backward_reduce", &affine_act_backward_reduce_cpu);
  m.impl("_affine_act_backward", &affine_act_backward_cpu);
}

}  // namespace epamx
