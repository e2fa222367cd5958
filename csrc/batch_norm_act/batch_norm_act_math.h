#pragma once
// Per-channel affine + activation, the elementwise half of a batch norm fused with what follows it:
//     out = act(x * scale[n, c] + shift[n, c]),  act: identity, ReLU or SiLU,
// with per-(n, c) coefficients so that a per-sample channel gate (squeeze-and-excitation) folds into them.
// The reductions a training batch norm needs (moments of x; sums of the activation's input gradient) are per
// (n, c) too, so the batch statistics and every coefficient of the backward pass are tiny (N, C) tensors.
#include <cmath>
#include <cstdint>

#include "common/fast_math.h"
#include "common/macros.h"

namespace epamx {

enum class Activation : int64_t { kIdentity = 0, kReLU = 1, kSiLU = 2 };

// x (N, C, S...) seen either as (N, C, S) (contiguous) or (N, S, C) (channels-last), S the product of the rest.
template <typename index_t>
struct AffineGeometry {
  index_t N, C, S;
  bool channels_last;
};

// The (n, c) row, n * C + c, of the element at memory offset i.
template <typename index_t>
HOST_DEVICE_INLINE index_t row_of(const AffineGeometry<index_t>& g, index_t i) {
  return g.channels_last ? i / (g.S * g.C) * g.C + i % g.C : i / g.S;
}

// As torch.relu (NaN propagates) and torch.nn.functional.silu (float32: sigmoid_of's polynomial exp, within a
// few ulp of torch's).
template <Activation act, typename acc_t>
HOST_DEVICE_INLINE acc_t activation_forward(acc_t z) {
  if constexpr (act == Activation::kReLU) {
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (act == Activation::kSiLU) {
    return z * sigmoid_of(z);
  } else {
    return z;
  }
}

// grad * act'(z), as threshold_backward (zero unless the output is positive) and silu_backward compute it.
template <Activation act, typename acc_t>
HOST_DEVICE_INLINE acc_t activation_backward(acc_t grad, acc_t z) {
  if constexpr (act == Activation::kReLU) {
    return z > acc_t(0) ? grad : acc_t(0);
  } else if constexpr (act == Activation::kSiLU) {
    const acc_t sig = sigmoid_of(z);
    return grad * sig * (acc_t(1) + z * (acc_t(1) - sig));
  } else {
    return grad;
  }
}

// Runs body.template operator()<act>() for a runtime activation code (checked by the caller).
template <typename F>
void dispatch_activation(int64_t act, F&& body) {
  switch (static_cast<Activation>(act)) {
    case Activation::kReLU: body.template operator()<Activation::kReLU>(); break;
    case Activation::kSiLU: body.template operator()<Activation::kSiLU>(); break;
    default: body.template operator()<Activation::kIdentity>(); break;
  }
}

// ---- per-thread bodies (the CUDA kernels run them; the CPU test hook runs them in any order) ------------------

// Thread i < numel: one output element.
template <Activation act, typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void affine_act_thread(index_t i, const AffineGeometry<index_t>& g, const scalar_t* x,
                                          const acc_t* scale, const acc_t* shift, scalar_t* out) {
  const index_t r = row_of(g, i);
  out[i] = static_cast<scalar_t>(activation_forward<act>(static_cast<acc_t>(x[i]) * scale[r] + shift[r]));
}

// The input gradient, elementwise: dx = coef_u * u + coef_x * x + coef_1 with u = grad * act'(x * scale + shift),
// per-row coefficients.
template <Activation act, typename scalar_t, typename acc_t>
HOST_DEVICE_INLINE scalar_t backward_element(scalar_t grad, scalar_t x, acc_t scale, acc_t shift, acc_t coef_u,
                                             acc_t coef_x, acc_t coef_1) {
  const acc_t xv = static_cast<acc_t>(x);
  const acc_t u = activation_backward<act>(static_cast<acc_t>(grad), xv * scale + shift);
  return static_cast<scalar_t>(coef_u * u + coef_x * xv + coef_1);
}

template <Activation act, typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void backward_thread(index_t i, const AffineGeometry<index_t>& g, const scalar_t* grad,
                                        const scalar_t* x, const acc_t* scale, const acc_t* shift,
                                        const acc_t* coef_u, const acc_t* coef_x, const acc_t* coef_1,
                                        scalar_t* dx) {
  const index_t r = row_of(g, i);
  dx[i] = backward_element<act>(grad[i], x[i], scale[r], shift[r], coef_u[r], coef_x[r], coef_1[r]);
}

// ---- the per-(n, c) row reductions on the GPU: two passes, deterministic ------------------------------------------
//
// _channel_moments and _affine_act_backward_reduce sum two terms of every element over each (n, c) row (S elements)
// into (N, C) float64 results. One thread per row would leave a GPU idle (EPAM-Net's first stage has 216 rows of
// 50176 elements), so the GPU reduces in two passes of one kernel, each block of kRowReduceThreads threads:
//
// - pass 1 cuts every row into `splits` slices; block (tile, split) sums slice `split` of the `items` rows of its
//   tile, each row read by `lanes` threads. In (N, C, S) memory a tile is consecutive rows and thread t reads row
//   t / lanes at lane t % lanes; in (N, S, C) memory a tile is consecutive channels of one sample and thread t reads
//   channel t % items at lane t / items. Either way consecutive threads read consecutive addresses, every step.
//   A lane adds its elements (lanes apart) in order, in double; the block then adds its lanes in a fixed tree
//   (row_reduce_tree_top) and writes partial[row * splits + split];
// - pass 2 is pass 1 over the (N * C, splits) matrix of partial sums, one slice per row (none when splits is 1:
//   pass 1 then writes the results).
//
// No atomics: every sum's grouping depends on the shape alone (row_reduce_plan), so the results are the same run to
// run, and on any GPU. The CPU test hook runs these bodies block by block in any order (batch_norm_act_cpu.cpp).
constexpr int kRowReduceThreads = 256;  // a block's threads: row_reduce_kernel's __launch_bounds__ and plan
static_assert(kRowReduceThreads % 32 == 0, "whole warps");

template <typename index_t>
struct RowReducePlan {
  index_t items, lanes;   // rows per block, threads per row (items * lanes <= kRowReduceThreads)
  index_t lane_stride;    // between the threads of one row's consecutive lanes: 1, or items in (N, S, C) memory
  index_t channel_tiles;  // (N, S, C) memory: tiles per sample, tile k holding channels [k * items, (k + 1) * items)
  index_t tiles;          // blocks across the rows
  index_t steps;          // elements per lane in a slice (lanes apart)
  index_t splits;         // slices per row: a pass runs tiles * splits blocks
};

// The first level of the lane tree: the largest power of two below `lanes` (0 for one lane). At level `half` lane
// l < half adds lane l + half's sum when l + half < lanes, then `half` halves; lane 0 ends with the row's sum.
template <typename index_t>
HOST_DEVICE_INLINE index_t row_reduce_tree_top(index_t lanes) {
  index_t half = 1;
  while (half * 2 < lanes) half *= 2;
  return lanes > 1 ? half : index_t(0);
}

// Pass 1's terms: x and x^2.
template <typename scalar_t>
struct MomentTerms {
  const scalar_t* x;
  struct Row {
    const scalar_t* x;
    template <typename index_t>
    HOST_DEVICE_INLINE void add(index_t k, double& s1, double& s2) const {
      const double v = static_cast<double>(x[k]);
      s1 += v;
      s2 += v * v;
    }
  };
  template <typename index_t>
  HOST_DEVICE_INLINE Row row(index_t) const {
    return {x};
  }
};

// Pass 1's terms of the backward reduction: u = grad * act'(x * scale + shift) and u * x.
template <Activation act, typename scalar_t, typename acc_t>
struct ActGradTerms {
  const scalar_t* grad;
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  struct Row {
    const scalar_t* grad;
    const scalar_t* x;
    acc_t scale, shift;
    template <typename index_t>
    HOST_DEVICE_INLINE void add(index_t k, double& s1, double& s2) const {
      const acc_t xv = static_cast<acc_t>(x[k]);
      const double u = static_cast<double>(activation_backward<act>(static_cast<acc_t>(grad[k]), xv * scale + shift));
      s1 += u;
      s2 += u * static_cast<double>(xv);
    }
  };
  template <typename index_t>
  HOST_DEVICE_INLINE Row row(index_t r) const {
    return {grad, x, scale[r], shift[r]};
  }
};

// Pass 2's terms: the partial sums pass 1 wrote, (N * C, splits) row-major.
struct PartialTerms {
  const double* sum1;
  const double* sum2;
  struct Row {
    const double* sum1;
    const double* sum2;
    template <typename index_t>
    HOST_DEVICE_INLINE void add(index_t k, double& s1, double& s2) const {
      s1 += sum1[k];
      s2 += sum2[k];
    }
  };
  template <typename index_t>
  HOST_DEVICE_INLINE Row row(index_t) const {
    return {sum1, sum2};
  }
};

// Thread t of block `block` (< tiles * splits): its lane's sums of its row's slice into s1, s2 (zero when it has
// nothing to read). Returns the row (n * C + c), or -1 for a thread with no row (t past items * lanes, or a channel
// past C in a sample's last tile); *lane gets its lane.
template <typename index_t, typename Terms>
HOST_DEVICE_INLINE index_t row_reduce_thread(index_t block, index_t t, const AffineGeometry<index_t>& g,
                                             const RowReducePlan<index_t>& p, const Terms& terms, double& s1,
                                             double& s2, index_t* lane_out) {
  s1 = 0;
  s2 = 0;
  const index_t tile = block / p.splits, split = block % p.splits;
  const index_t item = g.channels_last ? t % p.items : t / p.lanes;
  const index_t lane = g.channels_last ? t / p.items : t % p.lanes;
  *lane_out = lane;
  if (item >= p.items || lane >= p.lanes) return -1;
  // Row and offsets in 64 bits first: a tile's last item can lie past the last row (or channel) by up to items - 1.
  index_t row, base, stride;  // element s of the row is at base + s * stride
  if (g.channels_last) {
    const index_t n = tile / p.channel_tiles;
    const int64_t c = static_cast<int64_t>(tile % p.channel_tiles) * p.items + item;
    if (c >= g.C) return -1;
    row = n * g.C + static_cast<index_t>(c);
    base = n * g.S * g.C + static_cast<index_t>(c);
    stride = g.C;
  } else {
    const int64_t r = static_cast<int64_t>(tile) * p.items + item;
    if (r >= static_cast<int64_t>(g.N) * g.C) return -1;
    row = static_cast<index_t>(r);
    base = row * g.S;
    stride = 1;
  }
  // The lane's elements of the slice: s = first + k * lanes for k < count, all below S (first itself may not be).
  const int64_t first = static_cast<int64_t>(split) * p.steps * p.lanes + lane;
  const int64_t left = static_cast<int64_t>(g.S) - first;
  if (left <= 0) return row;
  const int64_t reach = (left + p.lanes - 1) / p.lanes;
  const index_t count = static_cast<index_t>(reach < p.steps ? reach : p.steps);
  const auto terms_of_row = terms.row(row);
  const index_t start = base + static_cast<index_t>(first) * stride, step = p.lanes * stride;
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
  for (index_t k = 0; k < count; ++k) terms_of_row.add(start + k * step, s1, s2);
  return row;
}

}  // namespace epamx
