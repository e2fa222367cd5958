#pragma once
// Channel pooling, the vectorised CPU kernels' interface (built once per instruction set: common/cpu_isa.h).
#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_isa.h"

namespace epamx {

// The arg-max channel as the kernels keep it: an integer of acc_t's width, so that a vector of them has as many
// lanes as a vector of acc_t.
template <typename scalar_t>
using PoolCpuIndex = std::conditional_t<sizeof(at::opmath_type<scalar_t>) == 8, int64_t, int32_t>;

template <typename scalar_t>
struct PoolCpuArgs {
  const scalar_t* x;     // dense (N, C, T, H, W): NCTHW, or NTHWC when channels_last
  scalar_t* out;         // forward: the pooled (N, 2, T', H, W), at the pooled strides
  const scalar_t* grad;  // backward: the incoming gradient (N, 2, T', H, W), at the pooled strides
  scalar_t* dx;          // backward: laid out like x
  int64_t pooled_stride_n, pooled_stride_c, pooled_stride_t, pooled_stride_p;  // of out or grad; p = h * W + w
  int64_t N, C, T, P, t_stride, T_out;
  bool channels_last;
  // Backward scratch for NCTHW. dx[n, c] is sample_dx[n] (T frames: the mean gradient / C at the pooled frames,
  // zeros between) except at the pooled positions whose arg-max is c, which get at_arg (max + mean gradient / C).
  // Per sample, N * T' * P in all: arg, the arg-max channel of each pooled position (t' * P + p), and by_channel,
  // those positions sorted by their arg-max, channel c's ending at bucket_end[n * C + c].
  PoolCpuIndex<scalar_t>* arg;
  scalar_t* sample_dx;  // N * T * P
  scalar_t* at_arg;     // N * T' * P
  int64_t* by_channel;
  int64_t* bucket_end;  // N * C
};

EPAMX_DECLARE_CPU_KERNELS(
    template <typename scalar_t> void channel_pool_forward_kernel(const PoolCpuArgs<scalar_t>& args);
    template <typename scalar_t> void channel_pool_backward_kernel(const PoolCpuArgs<scalar_t>& args);)

}  // namespace epamx
