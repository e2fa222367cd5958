#pragma once
// Batch norm + activation, the vectorised CPU kernels' interface (built once per instruction set: common/cpu_isa.h).
#include <ATen/OpMathType.h>

#include <cstdint>

#include "batch_norm_act/batch_norm_act_math.h"
#include "common/cpu_isa.h"

namespace epamx {

// x, grad and out are dense (N, C, S) tensors, or (N, S, C) when g.channels_last; the coefficients are dense
// (N, C) rows in acc_t; sum1 and sum2 are dense (N, C) float64 outputs.
template <typename scalar_t>
struct AffineCpuArgs {
  using acc_t = at::opmath_type<scalar_t>;
  AffineGeometry<int64_t> g;
  int64_t act;             // an Activation code, as the ops take it
  const scalar_t* x;
  const scalar_t* grad;    // the backward kernels only
  const acc_t* scale;      // not for the moments
  const acc_t* shift;      // not for the moments
  const acc_t* coef_u;     // affine_act_backward_kernel only
  const acc_t* coef_x;     // affine_act_backward_kernel only
  const acc_t* coef_1;     // affine_act_backward_kernel only
  scalar_t* out;           // affine_act's output, or dx
  double* sum1;            // the reductions' outputs
  double* sum2;
};

// channel_moments_kernel: sum1, sum2 = per-row sums of x and x^2. affine_act_kernel: out = act(x * scale + shift).
// affine_act_backward_reduce_kernel: per-row sums of u and u * x, u = grad * act'(x * scale + shift).
// affine_act_backward_kernel: out = coef_u * u + coef_x * x + coef_1. Row sums accumulate in double, in an order
// that does not depend on the thread count.
EPAMX_DECLARE_CPU_KERNELS(
    template <typename scalar_t> void channel_moments_kernel(const AffineCpuArgs<scalar_t>& args);
    template <typename scalar_t> void affine_act_kernel(const AffineCpuArgs<scalar_t>& args);
    template <typename scalar_t> void affine_act_backward_reduce_kernel(const AffineCpuArgs<scalar_t>& args);
    template <typename scalar_t> void affine_act_backward_kernel(const AffineCpuArgs<scalar_t>& args);)

}  // namespace epamx
