#pragma once
// Attention reweighting of EPAM-Net's RGB features by the pose-driven maps, the math shared by CPU and CUDA.
//
//   out = x * (1 + S * A)        x (N, C, T, P), S (N, T, P), A (N, T); P = H*W, S and A contiguous, x (and
//                                g, out, dx) NCTHW or, at the end of this file, NTHWC (channels_last_3d)
//   dx = g * (1 + S * A),   dS = A * sum_c g * x,   dA = sum_{c, p} g * x * S
//
// Everything is computed in acc_t (float for half/bfloat16 inputs). The formulas below are templates in the value
// type: the GPU and the thread-body hook use acc_t; the CPU kernels use vectors of acc_t (at::vec::Vectorized),
// element for element the same operations. The GPU's backward pass is split in two:
// `reweight_backward_run` makes one pass over g and x for some positions and a range of channels, writing dx
// and accumulating sum_c g*x; `reweight_backward_finish_frame` then reduces those partial sums per frame into
// dS and dA. On the GPU the channels are split into groups so that enough threads are in flight; the second,
// small step adds the groups' partial sums, one block per frame (a block reduction, in the CUDA file, adds dA).
#include "common/macros.h"

namespace epamx {

template <typename index_t>
struct ReweightGeometry {
  index_t N, C, T, P;
};

// 1 + S*A: the factor out = x * factor and dx = g * factor.
template <typename T>
HOST_DEVICE_INLINE T reweight_factor(T s, T a) {
  return T(1) + s * a;
}

// dS at a position from the sum over channels of g*x there.
template <typename T>
HOST_DEVICE_INLINE T reweight_grad_spatial(T a, T gx_sum) {
  return a * gx_sum;
}

// A position's term of dA (the sum of these over the frame's positions).
template <typename T>
HOST_DEVICE_INLINE T reweight_grad_temporal_term(T gx_sum, T s) {
  return gx_sum * s;
}

// Forward: elements [p0, p0 + count) of plane `plane` = (n * C + c) * T + t.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void reweight_forward_run(index_t plane, index_t p0, index_t count, const ReweightGeometry<index_t>& g,
                                             const scalar_t* x, const scalar_t* s, const scalar_t* a, scalar_t* out) {
  const index_t t = plane % g.T;
  const index_t frame = plane / (g.C * g.T) * g.T + t;
  const acc_t av = static_cast<acc_t>(a[frame]);
  const scalar_t* sp = s + frame * g.P + p0;
  const index_t base = plane * g.P + p0;
  for (index_t k = 0; k < count; ++k) {
    const acc_t factor = reweight_factor(static_cast<acc_t>(sp[k]), av);
    out[base + k] = static_cast<scalar_t>(static_cast<acc_t>(x[base + k]) * factor);
  }
}

// One GPU thread of the forward kernel: element i of x.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void reweight_forward_thread(index_t i, const ReweightGeometry<index_t>& g, const scalar_t* x,
                                                const scalar_t* s, const scalar_t* a, scalar_t* out) {
  reweight_forward_run<scalar_t, acc_t, index_t>(i / g.P, i % g.P, index_t(1), g, x, s, a, out);
}

// Backward, first step: positions [p0, p0 + count) of frame (n, t), channels [c0, c1). Writes dx there and adds
// sum_c g*x of each position to acc[k].
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void reweight_backward_run(index_t frame, index_t p0, index_t count, index_t c0, index_t c1,
                                              const ReweightGeometry<index_t>& g, const scalar_t* grad,
                                              const scalar_t* x, const scalar_t* s, const scalar_t* a, scalar_t* dx,
                                              acc_t* acc) {
  const index_t n = frame / g.T;
  const index_t t = frame % g.T;
  const acc_t av = static_cast<acc_t>(a[frame]);
  const scalar_t* sp = s + frame * g.P + p0;
  for (index_t c = c0; c < c1; ++c) {
    const index_t base = ((n * g.C + c) * g.T + t) * g.P + p0;
    for (index_t k = 0; k < count; ++k) {
      const acc_t gv = static_cast<acc_t>(grad[base + k]);
      dx[base + k] = static_cast<scalar_t>(gv * reweight_factor(static_cast<acc_t>(sp[k]), av));
      acc[k] += gv * static_cast<acc_t>(x[base + k]);
    }
  }
}

// The channel range of group `group` when C channels are split into `groups` near-equal groups.
template <typename index_t>
HOST_DEVICE_INLINE index_t channel_group_begin(index_t group, index_t groups, index_t C) {
  return group * (C / groups) + (group < C % groups ? group : C % groups);
}

// One GPU thread of the first backward step: position p of frame f for channel group q, i = (q * N*T + f) * P + p.
// Writes its partial sum to partial[i].
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void reweight_backward_thread(index_t i, index_t groups, const ReweightGeometry<index_t>& g,
                                                 const scalar_t* grad, const scalar_t* x, const scalar_t* s,
                                                 const scalar_t* a, scalar_t* dx, acc_t* partial) {
  const index_t p = i % g.P;
  const index_t rest = i / g.P;
  const index_t frame = rest % (g.N * g.T);
  const index_t q = rest / (g.N * g.T);
  acc_t acc[1] = {acc_t(0)};
  reweight_backward_run<scalar_t, acc_t, index_t>(frame, p, index_t(1), channel_group_begin(q, groups, g.C),
                                                  channel_group_begin(q + 1, groups, g.C), g, grad, x, s, a, dx, acc);
  partial[i] = acc[0];
}

// Backward, second step, at position p of one frame: partial[q * group_stride + p] holds group q's sum_c g*x there.
// Writes dS at the position and returns its term of dA (av is A of the frame).
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE acc_t reweight_backward_finish_position(index_t frame, index_t p, index_t groups,
                                                           index_t group_stride, const ReweightGeometry<index_t>& g,
                                                           const acc_t* partial, const scalar_t* s, acc_t av,
                                                           scalar_t* ds) {
  acc_t sum = 0;
  for (index_t q = 0; q < groups; ++q) sum += partial[q * group_stride + p];
  ds[frame * g.P + p] = static_cast<scalar_t>(reweight_grad_spatial(av, sum));
  return reweight_grad_temporal_term(sum, static_cast<acc_t>(s[frame * g.P + p]));
}

// Backward, second step, for one whole frame: dS at its P positions and dA, the sum of their terms. (The GPU gives
// each frame a block, whose threads share the positions and add their terms with a block reduction.)
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void reweight_backward_finish_frame(index_t frame, index_t groups, index_t group_stride,
                                                       const ReweightGeometry<index_t>& g, const acc_t* partial,
                                                       const scalar_t* s, const scalar_t* a, scalar_t* ds,
                                                       scalar_t* da) {
  const acc_t av = static_cast<acc_t>(a[frame]);
  acc_t total = 0;
  for (index_t p = 0; p < g.P; ++p) {
    total += reweight_backward_finish_position<scalar_t, acc_t, index_t>(frame, p, groups, group_stride, g, partial,
                                                                         s, av, ds);
  }
  da[frame] = static_cast<scalar_t>(total);
}

// ---- channels_last_3d (NTHWC) memory, on the GPU ------------------------------------------------------------------
// x, out, grad and dx are then (N, T, P, C): element i is channel i % C at position i / C = frame * P + p, whose S is
// s[i / C] (S stays dense (N, T, P)). The forward pass is elementwise; the backward pass's first step gives each
// position a team of lanes (common/teams.h) that reads its channels in consecutive addresses, writes their dx and
// adds their g*x, and one lane writes the team's sum as the position's partial sum, the second step then as above
// with one group (reweight_backward_finish_frame).

// One GPU thread of the forward kernel in NTHWC memory: element i.
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void reweight_forward_thread_cl(index_t i, const ReweightGeometry<index_t>& g, const scalar_t* x,
                                                   const scalar_t* s, const scalar_t* a, scalar_t* out) {
  const index_t position = i / g.C;
  const acc_t factor = reweight_factor(static_cast<acc_t>(s[position]), static_cast<acc_t>(a[position / g.P]));
  out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * factor);
}

// Backward, first step, in NTHWC memory: lane `lane` of the `width` lanes at `position` (= frame * P + p) takes the
// channels lane, lane + width, ... below C. Writes their dx and returns their sum of g*x (0 for a lane past C).
template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE acc_t reweight_backward_lane_cl(index_t position, index_t lane, index_t width,
                                                   const ReweightGeometry<index_t>& g, const scalar_t* grad,
                                                   const scalar_t* x, const scalar_t* s, const scalar_t* a,
                                                   scalar_t* dx) {
  acc_t sum = 0;
  if (lane >= g.C) return sum;
  const acc_t factor = reweight_factor(static_cast<acc_t>(s[position]), static_cast<acc_t>(a[position / g.P]));
  const index_t first = position * g.C + lane, count = (g.C - 1 - lane) / width + 1;  // c = lane + k * width < C
  for (index_t k = 0; k < count; ++k) {
    const index_t i = first + k * width;
    const acc_t gv = static_cast<acc_t>(grad[i]);
    dx[i] = static_cast<scalar_t>(gv * factor);
    sum += gv * static_cast<acc_t>(x[i]);
  }
  return sum;
}

}  // namespace epamx
