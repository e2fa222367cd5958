// Channel pooling on the CPU: argument checks, memory formats and outputs here; the vectorised loops are in
// channel_pool_cpu_kernel.cpp. Also the test hook that runs the CUDA kernels' per-thread bodies.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <utility>

#include "channel_pool/channel_pool.h"
#include "channel_pool/channel_pool_cpu_kernel.h"
#include "common/cpu_memory.h"
#include "common/teams.h"

namespace epamx {
namespace {

// The (N, 2, T', H, W) tensor's strides as the kernels take them (H and W merged: dense in either format).
template <typename scalar_t>
void set_pooled_strides(PoolCpuArgs<scalar_t>& args, const at::Tensor& pooled) {
  args.pooled_stride_n = pooled.stride(0);
  args.pooled_stride_c = pooled.stride(1);
  args.pooled_stride_t = pooled.stride(2);
  args.pooled_stride_p = pooled.size(4) > 1 ? pooled.stride(4) : pooled.stride(3);
}

template <typename scalar_t>
PoolCpuArgs<scalar_t> pool_cpu_args(const at::Tensor& x, int64_t t_stride, at::MemoryFormat format) {
  const auto g = pool_geometry<int64_t>(x, t_stride);
  PoolCpuArgs<scalar_t> args{};
  args.x = x.const_data_ptr<scalar_t>();
  args.N = g.N;
  args.C = g.C;
  args.T = g.T;
  args.P = g.P;
  args.t_stride = g.t_stride;
  args.T_out = g.T_out;
  args.channels_last = format == at::MemoryFormat::ChannelsLast3d;
  return args;
}

at::Tensor channel_pool_cpu(const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "channel_pool";
  check_pool_args(x_in, t_stride, op);
  // x is read in its memory format, NCTHW or NTHWC (channels_last_3d, as EPAM-Net runs on the CPU; other strides
  // are copied into the format x suggests), and the output has that format too.
  const at::MemoryFormat format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format);
  at::Tensor out = at::empty(pool_output_shape(x, t_stride), x.options().memory_format(format));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto args = pool_cpu_args<scalar_t>(x, t_stride, format);
    args.out = out.mutable_data_ptr<scalar_t>();
    set_pooled_strides(args, out);
    TORCH_INTERNAL_ASSERT(args.channels_last || args.pooled_stride_p == 1);
    EPAMX_CPU_KERNEL_CALL(channel_pool_forward_kernel<scalar_t>, args);
  });
  return out;
}

at::Tensor channel_pool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t t_stride) {
  constexpr const char* op = "_channel_pool_backward";
  check_pool_args(x_in, t_stride, op);
  check_pool_grad(grad_in, x_in, t_stride, op);
  // The kernels carry channel numbers in integers as wide as the float type they compute in.
  TORCH_CHECK_VALUE(x_in.size(1) <= std::numeric_limits<int32_t>::max(), op,
                    ": the CPU kernel handles at most 2^31 - 1 channels, got ", x_in.size(1));
  const at::MemoryFormat format = x_in.suggest_memory_format();  // dx follows x, as the output does
  const at::Tensor x = x_in.contiguous(format), grad = grad_in.contiguous(format);
  at::Tensor dx = empty_for_overwrite(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return dx;
  const auto g = pool_geometry<int64_t>(x, t_stride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto args = pool_cpu_args<scalar_t>(x, t_stride, format);
    args.grad = grad.const_data_ptr<scalar_t>();
    args.dx = dx.mutable_data_ptr<scalar_t>();
    set_pooled_strides(args, grad);
    at::Tensor arg, sample_dx, at_arg, by_channel, bucket_end;  // the NCTHW kernel's scratch
    if (!args.channels_last) {
      using index_t = PoolCpuIndex<scalar_t>;
      const int64_t pooled = g.N * g.T_out * g.P;
      arg = at::empty({pooled}, x.options().dtype(c10::CppTypeToScalarType<index_t>::value));
      sample_dx = at::empty({g.N * g.T * g.P}, x.options());
      at_arg = at::empty({pooled}, x.options());
      by_channel = at::empty({pooled}, x.options().dtype(at::kLong));
      bucket_end = at::empty({g.N * g.C}, x.options().dtype(at::kLong));
      args.arg = arg.mutable_data_ptr<index_t>();
      args.sample_dx = sample_dx.mutable_data_ptr<scalar_t>();
      args.at_arg = at_arg.mutable_data_ptr<scalar_t>();
      args.by_channel = by_channel.mutable_data_ptr<int64_t>();
      args.bucket_end = bucket_end.mutable_data_ptr<int64_t>();
    }
    EPAMX_CPU_KERNEL_CALL(channel_pool_backward_kernel<scalar_t>, args);
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
  // x, grad and the result in x's memory format, as the CUDA launchers read and write them.
  const at::MemoryFormat format = x_in.suggest_memory_format();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast3d;
  const at::Tensor x = x_in.contiguous(format);
  const auto options = x.options().memory_format(format);
  at::Tensor out = grad ? at::empty(x.sizes(), options) : at::empty(pool_output_shape(x, t_stride), options);
  const at::Tensor gr = grad ? grad->contiguous(format) : at::Tensor();
  const at::Tensor pooled = grad ? gr : out;  // the (N, 2, T', H, W) tensor the kernel also indexes
  const int64_t threads = pooled.size(0) * (grad ? x.size(2) : pooled.size(2)) * x.size(3) * x.size(4);
  TORCH_CHECK_VALUE(order.numel() == threads, op, ": order must list all ", threads, " thread indices, got ",
                    order.numel());
  const at::Tensor o = order.to(at::kLong).contiguous();
  // The index type the CUDA launcher would pick for these tensors, so the int32 bodies the GPU runs are tested.
  const auto run = [&]<typename index_t>() {
    const auto g = pool_geometry<index_t>(x, t_stride);
    const auto width = static_cast<index_t>(team_width(g.C));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      for (int64_t k = 0; k < threads; ++k) {
        const int64_t i = o.const_data_ptr<int64_t>()[k];
        TORCH_CHECK_VALUE(i >= 0 && i < threads, op, ": thread index ", i, " out of range");
        const auto position = static_cast<index_t>(i);
        if (channels_last && grad) {  // the team of input position i: lanes in descending order, butterfly, writes
          PoolArgMax<acc_t, index_t> lanes[kWarpLanes];
          for (index_t lane = width - 1; lane >= 0; --lane) {
            lanes[lane] = channel_pool_backward_lane_cl<scalar_t, acc_t, index_t>(position, lane, width, g, xp);
          }
          team_butterfly(lanes, width, [](const PoolArgMax<acc_t, index_t>& a, const PoolArgMax<acc_t, index_t>& b) {
            return pool_arg_max_combine(a, b);
          });
          for (index_t lane = width - 1; lane >= 0; --lane) {
            channel_pool_backward_write_cl<scalar_t, acc_t, index_t>(position, lane, width, lanes[lane].arg, g,
                                                                     gr.const_data_ptr<scalar_t>(),
                                                                     out.mutable_data_ptr<scalar_t>());
          }
        } else if (channels_last) {  // the team of output position i
          std::pair<acc_t, acc_t> lanes[kWarpLanes];  // (max, sum)
          for (index_t lane = width - 1; lane >= 0; --lane) {
            channel_pool_forward_lane_cl<scalar_t, acc_t, index_t>(position, lane, width, g, xp, lanes[lane].first,
                                                                   lanes[lane].second);
          }
          team_butterfly(lanes, width, [](const std::pair<acc_t, acc_t>& a, const std::pair<acc_t, acc_t>& b) {
            return std::pair<acc_t, acc_t>(pool_max_step(a.first, b.first), a.second + b.second);
          });
          channel_pool_forward_write_cl<scalar_t, acc_t, index_t>(position, g, lanes[0].first, lanes[0].second,
                                                                  out.mutable_data_ptr<scalar_t>());
        } else if (grad) {
          channel_pool_backward_thread<scalar_t, acc_t, index_t>(position, g, gr.const_data_ptr<scalar_t>(), xp,
                                                                 out.mutable_data_ptr<scalar_t>());
        } else {
          channel_pool_forward_thread<scalar_t, acc_t, index_t>(position, g, xp, out.mutable_data_ptr<scalar_t>());
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
