// Channel pooling, CPU kernels: at::parallel_for over frames, each scanning its channels plane by plane.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "channel_pool/channel_pool.h"
#include "common/cpu_memory.h"
#include "common/cpu_parallel.h"

namespace epamx {
namespace {

at::Tensor channel_pool_cpu(const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "channel_pool";
  check_pool_args(x_in, t_stride, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(pool_output_shape(x, t_stride), x.options());
  if (out.numel() == 0) return out;
  const auto g = pool_geometry<int64_t>(x, t_stride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.T_out, grain_for(g.C * g.P), [&](int64_t b, int64_t e) {
      std::vector<acc_t> best(g.P), sum(g.P);
      for (int64_t f = b; f < e; ++f) {
        channel_pool_forward_run<scalar_t, acc_t, int64_t>(f, 0, g.P, g, xp, outp, best.data(), sum.data());
      }
    });
  });
  return out;
}

at::Tensor channel_pool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "_channel_pool_backward";
  check_pool_args(x_in, t_stride, op);
  check_pool_grad(grad_in, x_in, t_stride, op);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = empty_for_overwrite(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  const auto g = pool_geometry<int64_t>(x, t_stride);
  // Two passes, so that dx is written in memory order: the arg-max of every pooled position first, then for
  // each (n, c) its T frames, one contiguous run (the GPU kernel instead gives each thread one position).
  at::Tensor arg = at::empty({g.N * g.T_out * g.P}, x.options().dtype(at::kLong));
  int64_t* argp = arg.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.T_out, grain_for(g.C * g.P), [&](int64_t b, int64_t e) {
      std::vector<acc_t> best(g.P), sum(g.P);
      for (int64_t f = b; f < e; ++f) {
        pool_scan_channels<scalar_t, acc_t, int64_t>(f / g.T_out, f % g.T_out * g.t_stride, 0, g.P, g, xp,
                                                     best.data(), argp + f * g.P, sum.data());
      }
    });
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
    at::parallel_for(0, g.N * g.C, grain_for(g.T * g.P), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / g.C, c = nc % g.C;
        for (int64_t t = 0; t < g.T; ++t) {
          scalar_t* dst = dxp + (nc * g.T + t) * g.P;
          if (t % g.t_stride != 0) {
            std::fill_n(dst, g.P, scalar_t(0));
            continue;
          }
          const int64_t f = n * g.T_out + t / g.t_stride;
          const int64_t* af = argp + f * g.P;
          const scalar_t* grad_max = gp + (n * 2 * g.T_out + t / g.t_stride) * g.P;
          const scalar_t* grad_mean = grad_max + g.T_out * g.P;
          for (int64_t k = 0; k < g.P; ++k) {
            dst[k] = static_cast<scalar_t>(pool_input_grad(c, af[k], static_cast<acc_t>(grad_max[k]),
                                                           static_cast<acc_t>(grad_mean[k]) * inv_c));
          }
        }
      }
    });
  });
  return dx;
}

}  // namespace

at::Tensor channel_pool_run_thread_bodies(const at::Tensor& x_in, int64_t t_stride, const std::optional<at::Tensor>& grad,
                                          const at::Tensor& order) {
  constexpr const char* op = "channel_pool_run_thread_bodies";
  check_pool_args(x_in, t_stride, op);
  check_device_type(x_in, c10::DeviceType::CPU, op, "x");
  check_device_type(order, c10::DeviceType::CPU, op, "order");
  if (grad) check_pool_grad(*grad, x_in, t_stride, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = grad ? at::empty(x.sizes(), x.options()) : at::empty(pool_output_shape(x, t_stride), x.options());
  const at::Tensor pooled = grad ? *grad : out;  // the (N, 2, T', H, W) tensor the kernel also indexes
  const int64_t threads = pooled.size(0) * (grad ? x.size(2) : pooled.size(2)) * x.size(3) * x.size(4);
  TORCH_CHECK_VALUE(order.numel() == threads, op, ": order must list all ", threads, " thread indices, got ",
                    order.numel());
  const at::Tensor o = order.to(at::kLong).contiguous();
  const at::Tensor gr = grad ? grad->contiguous() : at::Tensor();
  // The index type the CUDA launcher would pick for these tensors, so the int32 bodies the GPU runs are tested.
  const auto run = [&]<typename index_t>() {
    const auto g = pool_geometry<index_t>(x, t_stride);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t k = 0; k < threads; ++k) {
        const int64_t i = o.const_data_ptr<int64_t>()[k];
        TORCH_CHECK_VALUE(i >= 0 && i < threads, op, ": thread index ", i, " out of range");
        if (grad) {
          channel_pool_backward_thread<scalar_t, acc_t, index_t>(static_cast<index_t>(i), g,
                                                                 gr.const_data_ptr<scalar_t>(),
                                                                 x.const_data_ptr<scalar_t>(),
                                                                 out.mutable_data_ptr<scalar_t>());
        } else {
          channel_pool_forward_thread<scalar_t, acc_t, index_t>(static_cast<index_t>(i), g,
                                                                x.const_data_ptr<scalar_t>(),
                                                                out.mutable_data_ptr<scalar_t>());
        }
      }
    });
  };
  if (fits_int32(x) && fits_int32(pooled)) {
    run.template operator()<int32_t>();
  } else {
    run.template operator()<int64_t>();
  }
  return out;
}

TORCH_LIBRARY_IMPL(epamx, CPU, m) {
  m.impl("channel_pool", &channel_pool_cpu);
  m.impl("_channel_pool_backward", &channel_pool_backward_cpu);
}

}  // namespace epamx
