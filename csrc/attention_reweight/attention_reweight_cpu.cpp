// Attention reweighting, CPU kernels: at::parallel_for over frame planes (forward) or frames (backward).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_reweight/attention_reweight.h"
#include "common/cpu_parallel.h"
#include "common/cpu_memory.h"

namespace epamx {
namespace {

at::Tensor attention_reweight_cpu(const at::Tensor& x_in, const at::Tensor& spatial_in,
                                  const at::Tensor& temporal_in) {
  constexpr const char* op = "attention_reweight";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  const at::Tensor x = x_in.contiguous(), s = spatial_in.contiguous(), a = temporal_in.contiguous();
  at::Tensor out = empty_for_overwrite(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const auto g = reweight_geometry<int64_t>(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *sp = s.const_data_ptr<scalar_t>(),
                   *ap = a.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.C * g.T, grain_for(g.P), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        reweight_forward_run<scalar_t, acc_t, int64_t>(plane, 0, g.P, g, xp, sp, ap, outp);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_reweight_backward_cpu(const at::Tensor& grad_in,
                                                                               const at::Tensor& x_in,
                                                                               const at::Tensor& spatial_in,
                                                                               const at::Tensor& temporal_in) {
  constexpr const char* op = "_attention_reweight_backward";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  check_reweight_grad(grad_in, x_in, op);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), s = spatial_in.contiguous(),
                   a = temporal_in.contiguous();
  at::Tensor dx = empty_for_overwrite(x.sizes(), x.options());
  at::Tensor ds = at::empty(s.sizes(), s.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  // Sums over no channels or no pixels are zero (dA is not empty when only H*W is).
  if (x.numel() == 0) return {dx, ds.zero_(), da.zero_()};
  const auto g = reweight_geometry<int64_t>(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                   *sp = s.const_data_ptr<scalar_t>(), *ap = a.const_data_ptr<scalar_t>();
    scalar_t *dxp = dx.mutable_data_ptr<scalar_t>(), *dsp = ds.mutable_data_ptr<scalar_t>(),
             *dap = da.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.T, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.P);
      for (int64_t frame = begin; frame < end; ++frame) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        reweight_backward_run<scalar_t, acc_t, int64_t>(frame, 0, g.P, 0, g.C, g, gp, xp, sp, ap, dxp, acc.data());
        reweight_backward_finish_frame<scalar_t, acc_t, int64_t>(frame, 1, g.P, g, acc.data(), sp, ap, dsp, dap);
      }
    });
  });
  return {dx, ds, da};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_reweight_backward_run_thread_bodies(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& spatial_in, const at::Tensor& temporal_in,
    int64_t groups, const at::Tensor& order1, const at::Tensor& order2) {
  constexpr const char* op = "attention_reweight_backward_run_thread_bodies";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  check_reweight_grad(grad_in, x_in, op);
  check_device_type(x_in, c10::DeviceType::CPU, op, "x");
  check_device_type(order1, c10::DeviceType::CPU, op, "order1");
  check_device_type(order2, c10::DeviceType::CPU, op, "order2");
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), s = spatial_in.contiguous(),
                   a = temporal_in.contiguous();
  const int64_t C = x.size(1), frames = x.size(0) * x.size(2), P = x.size(3) * x.size(4);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= std::max<int64_t>(C, 1), op, ": groups must be in [1, C], got ", groups);
  const int64_t positions = frames * P;
  TORCH_CHECK_VALUE(order1.numel() == groups * positions && order2.numel() == frames, op,
                    ": order1 must list ", groups * positions, " threads and order2 ", frames);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor ds = at::empty(s.sizes(), s.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  const at::Tensor o1 = order1.to(at::kLong).contiguous(), o2 = order2.to(at::kLong).contiguous();
  // The CUDA launcher indexes with int32 (and refuses larger x): so do its bodies here, where x allows.
  const auto run = [&]<typename index_t>() {
    const auto g = reweight_geometry<index_t>(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<acc_t> partial(groups * positions);
      const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                     *sp = s.const_data_ptr<scalar_t>(), *ap = a.const_data_ptr<scalar_t>();
      for (int64_t k = 0; k < o1.numel(); ++k) {
        const int64_t i = o1.const_data_ptr<int64_t>()[k];
        TORCH_CHECK_VALUE(i >= 0 && i < groups * positions, op, ": order1 index ", i, " out of range");
        reweight_backward_thread<scalar_t, acc_t, index_t>(static_cast<index_t>(i), static_cast<index_t>(groups), g,
                                                           gp, xp, sp, ap, dx.mutable_data_ptr<scalar_t>(),
                                                           partial.data());
      }
      for (int64_t k = 0; k < o2.numel(); ++k) {
        const int64_t frame = o2.const_data_ptr<int64_t>()[k];
        TORCH_CHECK_VALUE(frame >= 0 && frame < frames, op, ": order2 index ", frame, " out of range");
        reweight_backward_finish_frame<scalar_t, acc_t, index_t>(
            static_cast<index_t>(frame), static_cast<index_t>(groups), static_cast<index_t>(positions), g,
            partial.data() + frame * P, sp, ap, ds.mutable_data_ptr<scalar_t>(), da.mutable_data_ptr<scalar_t>());
      }
    });
  };
  if (fits_int32(x)) {
    run.template operator()<int32_t>();
  } else {
    run.template operator()<int64_t>();
  }
  return {dx, ds, da};
}

TORCH_LIBRARY_IMPL(epamx, CPU, m) {
  m.impl("attention_reweight", &attention_reweight_cpu);
  m.impl("_attention_reweight_backward", &attention_reweight_backward_cpu);
}

}  // namespace epamx
