// Batch norm + activation, CPU kernels. Elementwise ops run at::parallel_for over pixels (channels-last: each
// pixel's C channels are one contiguous run, the coefficients a C-long row) or over (n, c) rows (contiguous).
// The per-(n, c) reductions accumulate in double; channels-last, each task sums a block of pixels into its own
// partial row, and the partials are added in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "batch_norm_act/batch_norm_act.h"
#include "common/cpu_memory.h"
#include "common/cpu_parallel.h"

namespace epamx {
namespace {

// Per-(n, c) sums of u and of u * x, (N, C) float64 each, where u = value(k, r) for the element at offset k of
// row r = n * C + c. Each run of elements first has its u computed into a buffer (a loop like the elementwise
// kernels', which vectorises), then summed in double (a plain conversion-and-add loop, which vectorises too).
template <typename scalar_t, typename acc_t, typename Value>
std::tuple<at::Tensor, at::Tensor> row_sums_cpu(const AffineGeometry<int64_t>& g, const scalar_t* xp,
                                                const at::TensorOptions& device, Value value) {
  at::Tensor s1 = at::zeros({g.N, g.C}, device.dtype(at::kDouble));
  at::Tensor s2 = at::zeros({g.N, g.C}, device.dtype(at::kDouble));
  if (g.N * g.C * g.S == 0) return {s1, s2};
  double* p1 = s1.mutable_data_ptr<double>();
  double* p2 = s2.mutable_data_ptr<double>();
  if (!g.channels_last) {
    constexpr int64_t kRun = 512;
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t b, int64_t e) {
      std::vector<acc_t> u(kRun);
      for (int64_t r = b; r < e; ++r) {
        double a1 = 0, a2 = 0;
        for (int64_t s0 = 0; s0 < g.S; s0 += kRun) {
          const int64_t len = std::min(kRun, g.S - s0), base = r * g.S + s0;
          for (int64_t j = 0; j < len; ++j) u[j] = value(base + j, r);
          for (int64_t j = 0; j < len; ++j) {
            const double d = static_cast<double>(u[j]);
            a1 += d;
            a2 += d * static_cast<double>(xp[base + j]);
          }
        }
        p1[r] = a1;
        p2[r] = a2;
      }
    });
    return {s1, s2};
  }
  // Blocks of pixels of one sample: enough blocks for the threads, few enough that the partials stay small.
  const int64_t block = std::max<int64_t>(grain_for(g.C), (g.S + 63) / 64);
  const int64_t blocks_per_n = (g.S + block - 1) / block;
  std::vector<double> partial(static_cast<size_t>(g.N * blocks_per_n * 2 * g.C), 0.0);
  at::parallel_for(0, g.N * blocks_per_n, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> u(g.C);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / blocks_per_n, s0 = task % blocks_per_n * block;
      const int64_t s_end = std::min(g.S, s0 + block);
      double* a1 = partial.data() + task * 2 * g.C;
      double* a2 = a1 + g.C;
      for (int64_t s = s0; s < s_end; ++s) {
        const int64_t base = (n * g.S + s) * g.C, row0 = n * g.C;
        for (int64_t c = 0; c < g.C; ++c) u[c] = value(base + c, row0 + c);
        for (int64_t c = 0; c < g.C; ++c) {
          const double d = static_cast<double>(u[c]);
          a1[c] += d;
          a2[c] += d * static_cast<double>(xp[base + c]);
        }
      }
    }
  });
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t j = 0; j < blocks_per_n; ++j) {
      const double* a1 = partial.data() + (n * blocks_per_n + j) * 2 * g.C;
      for (int64_t c = 0; c < g.C; ++c) {
        p1[n * g.C + c] += a1[c];
        p2[n * g.C + c] += a1[g.C + c];
      }
    }
  }
  return {s1, s2};
}

// Writes out[k] = f(k, r) for every element, r its (n, c) row.
template <typename F>
void for_each_element_cpu(const AffineGeometry<int64_t>& g, F f) {
  if (g.channels_last) {
    at::parallel_for(0, g.N * g.S, grain_for(g.C), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t base = p * g.C, row0 = p / g.S * g.C;
        for (int64_t c = 0; c < g.C; ++c) f(base + c, row0 + c);
      }
    });
  } else {
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        for (int64_t s = 0; s < g.S; ++s) f(r * g.S + s, r);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& x_in) {
  constexpr const char* op = "_channel_moments";
  check_affine_input(x_in, op);
  const at::Tensor x = affine_input(x_in);
  const auto g = affine_geometry<int64_t>(x, affine_channels_last(x));
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // u = x: the sums of x and x^2
    result = row_sums_cpu<scalar_t, double>(g, xp, x.options(),
                                            [xp](int64_t k, int64_t) { return static_cast<double>(xp[k]); });
  });
  return result;
}

at::Tensor affine_act_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                          int64_t act) {
  constexpr const char* op = "affine_act";
  check_affine_args(x_in, nullptr, scale_in, shift_in, op);
  check_activation(act, op);
  const at::Tensor x = affine_input(x_in);
  const bool cl = affine_channels_last(x);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor out = empty_for_overwrite(x.sizes(), x.options().memory_format(affine_memory_format(cl, x.dim())));
  if (x.numel() == 0) return out;
  const auto g = affine_geometry<int64_t>(x, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&]<Activation A>() {
      for_each_element_cpu(g, [=](int64_t k, int64_t r) {
        op_[k] = static_cast<scalar_t>(activation_forward<A>(static_cast<acc_t>(xp[k]) * sc[r] + sh[r]));
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_act_backward_reduce_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& scale_in,
                                                                  const at::Tensor& shift_in, int64_t act) {
  constexpr const char* op = "_affine_act_backward_reduce";
  check_affine_args(x_in, &grad_in, scale_in, shift_in, op);
  check_activation(act, op);
  const at::Tensor x = affine_input(x_in);
  const bool cl = affine_channels_last(x);
  const at::Tensor grad = affine_same_layout(grad_in, x, cl);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const auto g = affine_geometry<int64_t>(x, cl);
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = grad.const_data_ptr<scalar_t>();
    const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>();
    dispatch_activation(act, [&]<Activation A>() {
      result = row_sums_cpu<scalar_t, acc_t>(g, xp, x.options(), [=](int64_t k, int64_t r) {
        return activation_backward<A>(static_cast<acc_t>(gp[k]), static_cast<acc_t>(xp[k]) * sc[r] + sh[r]);
      });
    });
  });
  return result;
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
  const at::Tensor x = affine_input(x_in);
  const bool cl = affine_channels_last(x);
  const at::Tensor grad = affine_same_layout(grad_in, x, cl);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor cu = coef_u_in.contiguous(), cx = coef_x_in.contiguous(), c1 = coef_1_in.contiguous();
  at::Tensor dx = empty_for_overwrite(x.sizes(), x.options().memory_format(affine_memory_format(cl, x.dim())));
  if (x.numel() == 0) return dx;
  const auto g = affine_geometry<int64_t>(x, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = grad.const_data_ptr<scalar_t>();
    const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>();
    const acc_t *cup = cu.const_data_ptr<acc_t>(), *cxp = cx.const_data_ptr<acc_t>(), *c1p = c1.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&]<Activation A>() {
      for_each_element_cpu(g, [=](int64_t k, int64_t r) {
        dxp[k] = backward_element<A, scalar_t, acc_t>(gp[k], xp[k], sc[r], sh[r], cup[r], cxp[r], c1p[r]);
      });
    });
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
  const at::Tensor x = affine_input(x_in);
  const bool cl = affine_channels_last(x);
  const auto g = affine_geometry<int64_t>(x, cl);
  const bool per_row = kind == 0 || kind == 2;
  const int64_t threads = per_row ? g.N * g.C : x.numel();
  const at::Tensor order = order_in.to(at::kLong).contiguous();
  TORCH_CHECK_VALUE(order.numel() == threads, op, ": order must list all ", threads, " thread indices, got ",
                    order.numel());
  TORCH_CHECK_VALUE(kind < 2 || grad_in.has_value(), op, ": kind ", kind, " needs grad");
  if (grad_in) check_affine_grad(*grad_in, x, op);
  const at::Tensor grad = grad_in ? affine_same_layout(*grad_in, x, cl) : at::Tensor();
  std::vector<at::Tensor> out;
  if (per_row) {
    out = {at::empty({g.N, g.C}, x.options().dtype(at::kDouble)), at::empty({g.N, g.C}, x.options().dtype(at::kDouble))};
  } else {
    out = {at::empty(x.sizes(), x.options().memory_format(affine_memory_format(cl, x.dim())))};
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
