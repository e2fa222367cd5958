// Batch norm + activation on the CPU: argument checks, memory formats and outputs here; the vectorised loops are in
// batch_norm_act_cpu_kernel.cpp. Also the test hook that runs the CUDA kernels' per-thread bodies.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
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

// One block of the CUDA row_reduce_kernel: its threads in descending order, then the lane tree level by level, as
// the kernel's barriers order it; lane 0 of each row writes sum1/sum2[row * splits + block % splits].
template <typename Terms, typename index_t>
void row_reduce_block(index_t block, const AffineGeometry<index_t>& g, const RowReducePlan<index_t>& p,
                      const Terms& terms, double* sum1, double* sum2) {
  double lane_sum1[kRowReduceThreads], lane_sum2[kRowReduceThreads];
  index_t row[kRowReduceThreads], lane[kRowReduceThreads];
  for (index_t t = kRowReduceThreads - 1; t >= 0; --t) {
    row[t] = row_reduce_thread(block, t, g, p, terms, lane_sum1[t], lane_sum2[t], &lane[t]);
  }
  for (index_t half = row_reduce_tree_top(p.lanes); half > 0; half /= 2) {
    for (index_t t = 0; t < kRowReduceThreads; ++t) {
      if (row[t] >= 0 && lane[t] < half && lane[t] + half < p.lanes) {
        lane_sum1[t] += lane_sum1[t + half * p.lane_stride];
        lane_sum2[t] += lane_sum2[t + half * p.lane_stride];
      }
    }
  }
  for (index_t t = 0; t < kRowReduceThreads; ++t) {
    if (row[t] >= 0 && lane[t] == 0) {
      const index_t slot = row[t] * p.splits + block % p.splits;
      TORCH_INTERNAL_ASSERT(std::isnan(sum1[slot]), "row sum ", slot, " written twice");
      sum1[slot] = lane_sum1[t];
      sum2[slot] = lane_sum2[t];
    }
  }
}

// The CUDA launcher's two passes (batch_norm_act_cuda.cu, row_reduce), pass 1's blocks in the order `order`, into
// sum1 and sum2 (N * C each). Every output and partial sum starts as NaN: one never written stays NaN, and one
// written twice fails.
template <typename Terms, typename index_t>
void row_reduce_in_order(const AffineGeometry<index_t>& g, const Terms& terms, const int64_t* order, int64_t count,
                         double* sum1, double* sum2, const char* op) {
  const RowReducePlan<index_t> plan = row_reduce_plan(g, true);
  const int64_t rows = static_cast<int64_t>(g.N) * g.C, blocks = static_cast<int64_t>(plan.tiles) * plan.splits;
  TORCH_CHECK_VALUE(count == blocks, op, ": order must list all ", blocks, " blocks of the reduction's first pass, got ",
                    count);
  std::vector<double> partial(plan.splits == 1 ? 0 : 2 * rows * plan.splits, std::nan(""));
  double* part1 = plan.splits == 1 ? sum1 : partial.data();
  double* part2 = plan.splits == 1 ? sum2 : partial.data() + rows * plan.splits;
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK_VALUE(order[j] >= 0 && order[j] < blocks, op, ": block index ", order[j], " out of range");
    row_reduce_block(static_cast<index_t>(order[j]), g, plan, terms, part1, part2);
  }
  if (plan.splits == 1) return;
  const AffineGeometry<index_t> rows_g{index_t(1), static_cast<index_t>(rows), plan.splits, false};
  const RowReducePlan<index_t> rows_plan = row_reduce_plan(rows_g, false);
  for (index_t b = rows_plan.tiles * rows_plan.splits - 1; b >= 0; --b) {
    row_reduce_block(b, rows_g, rows_plan, PartialTerms{part1, part2}, sum1, sum2);
  }
}

}  // namespace

std::vector<int64_t> batch_norm_act_reduce_plan(const at::Tensor& x_in) {
  constexpr const char* op = "batch_norm_act_reduce_plan";
  check_affine_input(x_in, op);
  TORCH_CHECK_VALUE(x_in.numel() > 0, op, ": x must not be empty");
  const at::Tensor x = affine_input(x_in);
  const auto p = row_reduce_plan(affine_geometry<int64_t>(x, affine_channels_last(x)), true);
  return {p.items, p.lanes, p.channel_tiles, p.tiles, p.steps, p.splits};
}

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
  check_device_type(order_in, c10::DeviceType::CPU, op, "order");
  check_activation(act, op);
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, op, ": kind must be 0..3, got ", kind);
  TORCH_CHECK_VALUE(x_in.numel() > 0, op, ": x must not be empty");
  if (grad_in) check_affine_grad(*grad_in, x_in, op);  // before grad is put in x's layout
  TORCH_CHECK_VALUE(kind < 2 || grad_in.has_value(), op, ": kind ", kind, " needs grad");
  const AffineOperands in = affine_operands(x_in, grad_in ? &*grad_in : nullptr, {}, {});
  const at::Tensor &x = in.x, &grad = in.grad;
  const bool per_row = kind == 0 || kind == 2;
  const at::Tensor order = order_in.to(at::kLong).contiguous();
  const int64_t* idx = order.const_data_ptr<int64_t>();
  std::vector<at::Tensor> out;
  if (per_row) {
    const auto options = x.options().dtype(at::kDouble);
    out = {at::full({x.size(0), x.size(1)}, std::nan(""), options), at::full({x.size(0), x.size(1)}, std::nan(""), options)};
  } else {
    TORCH_CHECK_VALUE(order.numel() == x.numel(), op, ": order must list all ", x.numel(), " thread indices, got ",
                      order.numel());
    out = {at::empty(x.sizes(), in.output_options())};
  }
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
      // The index type the CUDA launcher picks for these tensors, so that the bodies the GPU runs are the ones tested.
      dispatch_index_type({&x, &grad}, [&]<typename index_t>() {
        const auto g = affine_geometry<index_t>(x, in.channels_last);
        if (kind == 0) {
          row_reduce_in_order(g, MomentTerms<scalar_t>{xp}, idx, order.numel(), out[0].mutable_data_ptr<double>(),
                              out[1].mutable_data_ptr<double>(), op);
          return;
        }
        if (kind == 2) {
          const ActGradTerms<A, scalar_t, acc_t> terms{grad.const_data_ptr<scalar_t>(), xp, coef(scale, "scale"),
                                                       coef(shift, "shift")};
          row_reduce_in_order(g, terms, idx, order.numel(), out[0].mutable_data_ptr<double>(),
                              out[1].mutable_data_ptr<double>(), op);
          return;
        }
        for (int64_t j = 0; j < order.numel(); ++j) {
          const int64_t i = idx[j];
          TORCH_CHECK_VALUE(i >= 0 && i < x.numel(), op, ": thread index ", i, " out of range");
          if (kind == 1) {
            affine_act_thread<A, scalar_t, acc_t, index_t>(static_cast<index_t>(i), g, xp, coef(scale, "scale"),
                                                           coef(shift, "shift"), out[0].mutable_data_ptr<scalar_t>());
          } else {
            backward_thread<A, scalar_t, acc_t, index_t>(
                static_cast<index_t>(i), g, grad.const_data_ptr<scalar_t>(), xp, coef(scale, "scale"),
                coef(shift, "shift"), coef(coef_u, "coef_u"), coef(coef_x, "coef_x"), coef(coef_1, "coef_1"),
                out[0].mutable_data_ptr<scalar_t>());
          }
        }
      });
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
