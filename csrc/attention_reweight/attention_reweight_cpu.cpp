// Attention reweighting on the CPU: argument checks, memory formats and outputs here; the vectorised loops are in
// attention_reweight_cpu_kernel.cpp. Also the test hook that runs the CUDA kernels' per-thread bodies.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_reweight/attention_reweight.h"
#include "attention_reweight/attention_reweight_cpu_kernel.h"
#include "common/cpu_memory.h"
#include "common/teams.h"

namespace epamx {
namespace {

template <typename scalar_t>
ReweightCpuArgs<scalar_t> reweight_cpu_args(const at::Tensor& x, const at::Tensor& s, const at::Tensor& a,
                                            at::MemoryFormat format) {
  ReweightCpuArgs<scalar_t> args{};
  args.x = x.const_data_ptr<scalar_t>();
  args.s = s.const_data_ptr<scalar_t>();
  args.a = a.const_data_ptr<scalar_t>();
  args.N = x.size(0);
  args.C = x.size(1);
  args.T = x.size(2);
  args.P = x.size(3) * x.size(4);
  args.channels_last = format == at::MemoryFormat::ChannelsLast3d;
  return args;
}

at::Tensor attention_reweight_cpu(const at::Tensor& x_in, const at::Tensor& spatial_in,
                                  const at::Tensor& temporal_in) {
  constexpr const char* op = "attention_reweight";
  check_reweight_args(x_in, spatial_in, temporal_in, op);
  // x is read and out written in x's memory format: NCTHW, or NTHWC (channels_last_3d, as EPAM-Net runs on the
  // CPU). Other strides are copied into the format x suggests.
  const at::MemoryFormat format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format), s = spatial_in.contiguous(), a = temporal_in.contiguous();
  at::Tensor out = empty_for_overwrite(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto args = reweight_cpu_args<scalar_t>(x, s, a, format);
    args.out = out.mutable_data_ptr<scalar_t>();
    EPAMX_CPU_KERNEL_CALL(attention_reweight_forward_kernel<scalar_t>, args);
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
  const at::MemoryFormat format = x_in.suggest_memory_format();  // dx follows x, as out does
  const at::Tensor grad = grad_in.contiguous(format), x = x_in.contiguous(format), s = spatial_in.contiguous(),
                   a = temporal_in.contiguous();
  at::Tensor dx = empty_for_overwrite(x.sizes(), x.options().memory_format(format));
  at::Tensor ds = at::empty(s.sizes(), s.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  // Sums over no channels or no pixels are zero (dA is not empty when only H*W is).
  if (x.numel() == 0) return {dx, ds.zero_(), da.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto args = reweight_cpu_args<scalar_t>(x, s, a, format);
    args.grad = grad.const_data_ptr<scalar_t>();
    args.out = dx.mutable_data_ptr<scalar_t>();
    args.ds = ds.mutable_data_ptr<scalar_t>();
    args.da = da.mutable_data_ptr<scalar_t>();
    EPAMX_CPU_KERNEL_CALL(attention_reweight_backward_kernel<scalar_t>, args);
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
  // x and grad in x's memory format, as the CUDA launcher reads them.
  const at::MemoryFormat format = x_in.suggest_memory_format();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast3d;
  const at::Tensor grad = grad_in.contiguous(format), x = x_in.contiguous(format), s = spatial_in.contiguous(),
                   a = temporal_in.contiguous();
  const int64_t C = x.size(1), frames = x.size(0) * x.size(2), P = x.size(3) * x.size(4);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= std::max<int64_t>(C, 1), op, ": groups must be in [1, C], got ", groups);
  TORCH_CHECK_VALUE(!channels_last || groups == 1, op,
                    ": a channels_last_3d x takes one group (a team of lanes per position), got ", groups);
  const int64_t positions = frames * P;
  TORCH_CHECK_VALUE(order1.numel() == groups * positions && order2.numel() == frames, op,
                    ": order1 must list ", groups * positions, " threads and order2 ", frames);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format));
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
        if (channels_last) {  // the team of position i: its lanes in descending order, then their butterfly
          const int width = team_width(C);
          acc_t lane_sums[kWarpLanes];
          for (int lane = width - 1; lane >= 0; --lane) {
            lane_sums[lane] = reweight_backward_lane_cl<scalar_t, acc_t, index_t>(
                static_cast<index_t>(i), static_cast<index_t>(lane), static_cast<index_t>(width), g, gp, xp, sp, ap,
                dx.mutable_data_ptr<scalar_t>());
          }
          team_butterfly(lane_sums, width, [](acc_t u, acc_t v) { return u + v; });
          partial[i] = lane_sums[0];
          continue;
        }
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
