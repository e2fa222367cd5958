#pragma once
// Channel pooling of EPAM-Net's pose features, the math shared by CPU and CUDA.
//
//   out[n, 0, t', p] = max_c  x[n, c, t' * t_stride, p]
//   out[n, 1, t', p] = mean_c x[n, c, t' * t_stride, p]       t' < T' = ceil(T / t_stride)
//
// x (N, C, T, P) and out (N, 2, T', P) contiguous, P = H*W: the layout the GPU kernels and the thread-body hook
// index (the CPU kernels apply the same rules to vectors, in NCTHW or NTHWC memory). Only the frames 0, t_stride,
// 2 t_stride, ... are read, so no strided copy of the features is made. The mean accumulates in acc_t. The maximum
// is taken as torch.max takes it: NaN wins, and among equal maxima the first channel does. The backward pass
// recomputes that arg-max from x and routes the max gradient to it alone; the mean gradient goes to every channel.
#include "common/macros.h"

namespace epamx {

template <typename index_t>
struct PoolGeometry {
  index_t N, C, T, P, t_stride, T_out;
};

// Whether v replaces best as the running arg-max: greater, or the first NaN.
template <typename acc_t>
HOST_DEVICE_INLINE bool pool_takes_max(acc_t v, acc_t best) {
  return v > best || (v != v && best == best);
}

// The running maximum when only its value is needed: a branch-free select (NaN wins, as in pool_takes_max).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t pool_max_step(acc_t best, acc_t v) {
  return (v > best || v != v) ? v : best;
}

// Arg-max over channels and the channel sum at positions [p0, p0 + count) of input frame (n, t).
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void pool_scan_channels(index_t n, index_t t, index_t p0, index_t count,
                                           const PoolGeometry<index_t>& g, const scalar_t* x, acc_t* best,
                                           index_t* arg, acc_t* sum) {
  const scalar_t* xf = x + (n * g.C * g.T + t) * g.P + p0;
  const index_t channel_stride = g.T * g.P;
  for (index_t k = 0; k < count; ++k) {
    best[k] = static_cast<acc_t>(xf[k]);
    arg[k] = 0;
    sum[k] = best[k];
  }
  for (index_t c = 1; c < g.C; ++c) {
    const scalar_t* xc = xf + c * channel_stride;
    for (index_t k = 0; k < count; ++k) {
      const acc_t v = static_cast<acc_t>(xc[k]);
      if (pool_takes_max(v, best[k])) {
        best[k] = v;
        arg[k] = c;
      }
      sum[k] += v;
    }
  }
}

// Forward: positions [p0, p0 + count) of output frame f = n * T' + t'. best and sum are scratch of `count`.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_forward_run(index_t frame_out, index_t p0, index_t count,
                                                 const PoolGeometry<index_t>& g, const scalar_t* x, scalar_t* out,
                                                 acc_t* best, acc_t* sum) {
  const index_t n = frame_out / g.T_out;
  const index_t t_out = frame_out % g.T_out;
  const scalar_t* xf = x + (n * g.C * g.T + t_out * g.t_stride) * g.P + p0;
  const index_t channel_stride = g.T * g.P;
  for (index_t k = 0; k < count; ++k) best[k] = sum[k] = static_cast<acc_t>(xf[k]);
  for (index_t c = 1; c < g.C; ++c) {
    const scalar_t* xc = xf + c * channel_stride;
    for (index_t k = 0; k < count; ++k) {
      const acc_t v = static_cast<acc_t>(xc[k]);
      best[k] = pool_max_step(best[k], v);
      sum[k] += v;
    }
  }
  scalar_t* max_out = out + (n * 2 * g.T_out + t_out) * g.P + p0;
  scalar_t* mean_out = max_out + g.T_out * g.P;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  for (index_t k = 0; k < count; ++k) {
    max_out[k] = static_cast<scalar_t>(best[k]);
    mean_out[k] = static_cast<scalar_t>(sum[k] * inv_c);
  }
}

// One GPU thread of the forward kernel: output position i of N * T' * P.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_forward_thread(index_t i, const PoolGeometry<index_t>& g, const scalar_t* x,
                                                    scalar_t* out) {
  acc_t best[1], sum[1];
  channel_pool_forward_run<scalar_t, acc_t, index_t>(i / g.P, i % g.P, index_t(1), g, x, out, best, sum);
}

// The gradient channel c receives at a pooled position: the max gradient if c is the arg-max, plus the mean
// gradient already divided by C.
template <typename acc_t, typename index_t>
HOST_DEVICE_INLINE acc_t pool_input_grad(index_t c, index_t arg, acc_t grad_max, acc_t grad_mean_over_c) {
  return c == arg ? grad_max + grad_mean_over_c : grad_mean_over_c;
}

// Backward: dx at positions [p0, p0 + count) of input frame f = n * T + t, every channel. Frames the pooling
// skipped get zeros.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_backward_run(index_t frame_in, index_t p0, index_t count,
                                                  const PoolGeometry<index_t>& g, const scalar_t* grad,
                                                  const scalar_t* x, scalar_t* dx, acc_t* best, index_t* arg,
                                                  acc_t* sum) {
  const index_t n = frame_in / g.T;
  const index_t t = frame_in % g.T;
  scalar_t* dxf = dx + (n * g.C * g.T + t) * g.P + p0;
  const index_t channel_stride = g.T * g.P;
  if (t % g.t_stride != 0) {
    for (index_t c = 0; c < g.C; ++c) {
      for (index_t k = 0; k < count; ++k) dxf[c * channel_stride + k] = scalar_t(0);
    }
    return;
  }
  const index_t t_out = t / g.t_stride;
  pool_scan_channels<scalar_t, acc_t, index_t>(n, t, p0, count, g, x, best, arg, sum);
  const scalar_t* grad_max = grad + (n * 2 * g.T_out + t_out) * g.P + p0;
  const scalar_t* grad_mean = grad_max + g.T_out * g.P;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  // best and sum are free again: reuse them for the two incoming gradients.
  for (index_t k = 0; k < count; ++k) {
    best[k] = static_cast<acc_t>(grad_max[k]);
    sum[k] = static_cast<acc_t>(grad_mean[k]) * inv_c;
  }
  for (index_t c = 0; c < g.C; ++c) {
    for (index_t k = 0; k < count; ++k) {
      dxf[c * channel_stride + k] = static_cast<scalar_t>(pool_input_grad(c, arg[k], best[k], sum[k]));
    }
  }
}

// One GPU thread of the backward kernel: input position i of N * T * P.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_backward_thread(index_t i, const PoolGeometry<index_t>& g, const scalar_t* grad,
                                                     const scalar_t* x, scalar_t* dx) {
  acc_t best[1], sum[1];
  index_t arg[1];
  channel_pool_backward_run<scalar_t, acc_t, index_t>(i / g.P, i % g.P, index_t(1), g, grad, x, dx, best, arg, sum);
}

}  // namespace epamx
