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

template <typename index_t>
HOST_DEVICE_INLINE index_t element_offset(const AffineGeometry<index_t>& g, index_t n, index_t c, index_t s) {
  return g.channels_last ? (n * g.S + s) * g.C + c : (n * g.C + c) * g.S + s;
}

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

// Thread i < N * C: row i's sum and sum of squares over S, in double (the variance is their difference).
template <typename scalar_t, typename index_t>
HOST_DEVICE_INLINE void moments_thread(index_t i, const AffineGeometry<index_t>& g, const scalar_t* x, double* sum,
                                       double* sumsq) {
  const index_t n = i / g.C, c = i % g.C;
  double s1 = 0, s2 = 0;
  for (index_t s = 0; s < g.S; ++s) {
    const double v = static_cast<double>(x[element_offset(g, n, c, s)]);
    s1 += v;
    s2 += v * v;
  }
  sum[i] = s1;
  sumsq[i] = s2;
}

// Thread i < numel: one output element.
template <Activation act, typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void affine_act_thread(index_t i, const AffineGeometry<index_t>& g, const scalar_t* x,
                                          const acc_t* scale, const acc_t* shift, scalar_t* out) {
  const index_t r = row_of(g, i);
  out[i] = static_cast<scalar_t>(activation_forward<act>(static_cast<acc_t>(x[i]) * scale[r] + shift[r]));
}

// Thread i < N * C: with u = grad * act'(x * scale + shift), row i's sum of u and of u * x, in double.
template <Activation act, typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE void backward_reduce_thread(index_t i, const AffineGeometry<index_t>& g, const scalar_t* grad,
                                               const scalar_t* x, const acc_t* scale, const acc_t* shift,
                                               double* sum_u, double* sum_ux) {
  const index_t n = i / g.C, c = i % g.C;
  double s1 = 0, s2 = 0;
  for (index_t s = 0; s < g.S; ++s) {
    const index_t k = element_offset(g, n, c, s);
    const acc_t xv = static_cast<acc_t>(x[k]);
    const double u = static_cast<double>(activation_backward<act>(static_cast<acc_t>(grad[k]), xv * scale[i] + shift[i]));
    s1 += u;
    s2 += u * static_cast<double>(xv);
  }
  sum_u[i] = s1;
  sum_ux[i] = s2;
}

// The input gradient, elementwise: dx = coef_u * u + coef_x * x + coef_1 with u as above, per-row coefficients.
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

}  // namespace epamx
