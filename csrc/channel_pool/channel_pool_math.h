#pragma once
// Channel pooling of EPAM-Net's pose features, the math shared by CPU and CUDA.
//
//   out[n, 0, t', p] = max_c  x[n, c, t' * t_stride, p]
//   out[n, 1, t', p] = mean_c x[n, c, t' * t_stride, p]       t' < T' = ceil(T / t_stride)
//
// x (N, C, T, P) and out (N, 2, T', P) contiguous, P = H*W, or both channels-last (at the end of this file): the
// layouts the GPU kernels and the thread-body hook index (the CPU kernels apply the same rules to vectors, in NCTHW
// or NTHWC memory). Only the frames 0, t_stride, 2 t_stride, ... are read, so no strided copy of the features is
// made. The mean accumulates in acc_t. The maximum is taken as torch.max takes it: NaN wins, and among equal maxima
// the first channel does. The backward pass recomputes that arg-max from x and routes the max gradient to it alone;
// the mean gradient goes to every channel.
#include <limits>

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

// ---- channels_last_3d (NTHWC) memory, on the GPU ------------------------------------------------------------------
// x and dx are then (N, T, P, C) and the pooled tensor (N, T', P, 2), a position's max and mean side by side. Each
// position gets a team of lanes (common/teams.h): lane l reads channels l, l + width, ... in consecutive addresses,
// and the team's butterfly combines the lanes' maxima and sums (forward) or arg-maxima (backward).

// A running arg-max: the value and its channel.
template <typename acc_t, typename index_t>
struct PoolArgMax {
  acc_t value;
  index_t arg;
};

// Two arg-maxima of disjoint channel sets combined as pool_scan_channels scans: a NaN beats a number, a larger value
// a smaller one, and between equal values (or two NaNs) the lower channel wins. So the combined arg-max is the
// first NaN channel, else the first channel holding the maximum, whatever the grouping; the rule is symmetric, so a
// butterfly leaves every lane with the same one.
template <typename acc_t, typename index_t>
HOST_DEVICE_INLINE PoolArgMax<acc_t, index_t> pool_arg_max_combine(PoolArgMax<acc_t, index_t> a,
                                                                   PoolArgMax<acc_t, index_t> b) {
  const bool a_nan = a.value != a.value, b_nan = b.value != b.value;
  if (a_nan != b_nan) return a_nan ? a : b;
  if (!a_nan && a.value != b.value) return a.value > b.value ? a : b;
  return a.arg < b.arg ? a : b;
}

// The channels lane `lane` of `width` takes at one position: c = lane + k * width for k < the count returned.
template <typename index_t>
HOST_DEVICE_INLINE index_t pool_lane_channels(index_t lane, index_t width, index_t C) {
  return lane < C ? (C - 1 - lane) / width + 1 : index_t(0);
}

// Forward in NTHWC memory: lane `lane` of the `width` lanes at output position `position` (= (n * T' + t') * P + p):
// the maximum (pool_max_step) and sum of its channels of input frame t' * t_stride; -inf and 0 for a lane past C.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_forward_lane_cl(index_t position, index_t lane, index_t width,
                                                     const PoolGeometry<index_t>& g, const scalar_t* x, acc_t& best,
                                                     acc_t& sum) {
  best = -std::numeric_limits<acc_t>::infinity();
  sum = 0;
  const index_t count = pool_lane_channels(lane, width, g.C);
  if (count == 0) return;
  const index_t frame_out = position / g.P, p = position % g.P;
  const index_t n = frame_out / g.T_out, t_out = frame_out % g.T_out;
  const scalar_t* xc = x + ((n * g.T + t_out * g.t_stride) * g.P + p) * g.C + lane;
  best = sum = static_cast<acc_t>(xc[0]);
  for (index_t k = 1; k < count; ++k) {
    const acc_t v = static_cast<acc_t>(xc[k * width]);
    best = pool_max_step(best, v);
    sum += v;
  }
}

// The forward result of `position` from its team's combined maximum and sum.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_forward_write_cl(index_t position, const PoolGeometry<index_t>& g, acc_t best,
                                                      acc_t sum, scalar_t* out) {
  out[2 * position] = static_cast<scalar_t>(best);
  out[2 * position + 1] = static_cast<scalar_t>(sum * (acc_t(1) / static_cast<acc_t>(g.C)));
}

// Backward in NTHWC memory, first half: lane `lane` of the `width` lanes at input position `position`
// (= (n * T + t) * P + p): the arg-max of its channels (pool_takes_max, in channel order). A lane past C, or any lane
// of a frame the pooling skipped, reads nothing and gives (-inf, C), which every channel's value beats or ties.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE PoolArgMax<acc_t, index_t> channel_pool_backward_lane_cl(index_t position, index_t lane,
                                                                            index_t width,
                                                                            const PoolGeometry<index_t>& g,
                                                                            const scalar_t* x) {
  PoolArgMax<acc_t, index_t> best{-std::numeric_limits<acc_t>::infinity(), g.C};
  const index_t count = pool_lane_channels(lane, width, g.C);
  if (count == 0 || position / g.P % g.T % g.t_stride != 0) return best;
  const scalar_t* xc = x + position * g.C + lane;
  best = {static_cast<acc_t>(xc[0]), lane};
  for (index_t k = 1; k < count; ++k) {
    const acc_t v = static_cast<acc_t>(xc[k * width]);
    if (pool_takes_max(v, best.value)) best = {v, lane + k * width};
  }
  return best;
}

// Backward in NTHWC memory, second half: the lane's channels of dx at `position`, given the team's arg-max `arg`:
// pool_input_grad at a pooled frame, zeros at a skipped one.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void channel_pool_backward_write_cl(index_t position, index_t lane, index_t width, index_t arg,
                                                       const PoolGeometry<index_t>& g, const scalar_t* grad,
                                                       scalar_t* dx) {
  const index_t count = pool_lane_channels(lane, width, g.C);
  if (count == 0) return;
  scalar_t* dxc = dx + position * g.C + lane;
  const index_t frame_in = position / g.P, p = position % g.P;
  const index_t n = frame_in / g.T, t = frame_in % g.T;
  if (t % g.t_stride != 0) {
    for (index_t k = 0; k < count; ++k) dxc[k * width] = scalar_t(0);
    return;
  }
  const index_t pooled = (n * g.T_out + t / g.t_stride) * g.P + p;
  const acc_t grad_max = static_cast<acc_t>(grad[2 * pooled]);
  const acc_t grad_mean_over_c = static_cast<acc_t>(grad[2 * pooled + 1]) * (acc_t(1) / static_cast<acc_t>(g.C));
  for (index_t k = 0; k < count; ++k) {
    dxc[k * width] = static_cast<scalar_t>(pool_input_grad(lane + k * width, arg, grad_max, grad_mean_over_c));
  }
}

}  // namespace epamx
