// Batch norm + activation, the vectorised CPU kernels, built once per instruction set (common/cpu_isa.h). They
// compute batch_norm_act_math.h's formulas on vectors of acc_t, with fast_math.h's sigmoid written lane-wise for
// float (the same formula, so results agree with the per-thread bodies the CUDA kernels run up to the compiler's
// fusing of multiply-adds).
//
// Contiguous: a row (n, c) is S contiguous elements sharing one coefficient, broadcast to a vector. Channels-last:
// each pixel's C channels are contiguous and take the C coefficients of their sample's rows, loaded as vectors.
// Row sums: each run of elements has u (and x) computed into buffers with vectors, then summed in double lanes.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "batch_norm_act/batch_norm_act_cpu_kernel.h"
#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"
#include "common/fast_math.h"

namespace epamx {
namespace CPU_CAPABILITY {
namespace {

using FVec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;

// fast_math.h's exp_nonpositive, lane by lane.
FVec exp_nonpositive(const FVec& x) {
  const FVec xc = FVec::blendv(FVec(-88.0f), x, x >= FVec(-88.0f));
  const FVec round(12582912.0f);
  const FVec k = (xc * FVec(1.44269504088896341f) + round) - round;
  const FVec r = (xc - k * FVec(0.693145751953125f)) - k * FVec(1.42860682030941723e-06f);
  FVec p(1.0f / 5040.0f);
  p = p * r + FVec(1.0f / 720.0f);
  p = p * r + FVec(1.0f / 120.0f);
  p = p * r + FVec(1.0f / 24.0f);
  p = p * r + FVec(1.0f / 6.0f);
  p = p * r + FVec(0.5f);
  p = p * r + FVec(1.0f);
  p = p * r + FVec(1.0f);
  // 2^k from its bit pattern, as exp2_int
  const FVec two_k = at::vec::cast<float>((at::vec::convert_to_int_of_same_size(k) + IVec(127)) << IVec(23));
  return FVec::blendv(FVec(0.0f), p * two_k, x >= FVec(-87.0f));
}

// fast_math.h's sigmoid_of, lane by lane (float); float64 lanes call the scalar function.
FVec sigmoid(const FVec& z) {
  const FVec nonnegative = z >= FVec(0.0f);
  const FVec e = exp_nonpositive(FVec::blendv(z, FVec(0.0f) - z, nonnegative));
  const FVec r = FVec(1.0f) / (FVec(1.0f) + e);
  return FVec::blendv(e * r, r, nonnegative);
}

at::vec::Vectorized<double> sigmoid(const at::vec::Vectorized<double>& z) {
  return z.map([](double v) { return sigmoid_of(v); });
}

// activation_forward and activation_backward (batch_norm_act_math.h) on vectors.
template <Activation act, typename Vec>
Vec activate(const Vec& z) {
  if constexpr (act == Activation::kReLU) {
    return Vec::blendv(z, Vec(0), z < Vec(0));
  } else if constexpr (act == Activation::kSiLU) {
    return z * sigmoid(z);
  } else {
    return z;
  }
}

template <Activation act, typename Vec>
Vec activation_grad(const Vec& grad, const Vec& z) {
  if constexpr (act == Activation::kReLU) {
    return Vec::blendv(Vec(0), grad, z > Vec(0));
  } else if constexpr (act == Activation::kSiLU) {
    const Vec sig = sigmoid(z);
    return grad * sig * (Vec(1) + z * (Vec(1) - sig));
  } else {
    return grad;
  }
}

// Calls body(k, count, coef) for every vector of elements, in parallel: k the offset of its first element, count
// (<= the vector width) its length, and coef(p) the vector of the per-row coefficients p[row] of its lanes.
template <typename scalar_t, typename Body>
void for_each_vector(const AffineGeometry<int64_t>& g, const Body& body) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = IO::kWidth;
  if (g.channels_last) {
    at::parallel_for(0, g.N * g.S, grain_for(g.C), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t base = p * g.C, row0 = p / g.S * g.C;
        for (int64_t c = 0; c < g.C; c += W) {
          const int64_t count = std::min(W, g.C - c);
          body(base + c, count, [&](const acc_t* coef) { return Vec::loadu(coef + row0 + c, count); });
        }
      }
    });
  } else {
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        for (int64_t s = 0; s < g.S; s += W) {
          body(r * g.S + s, std::min(W, g.S - s), [&](const acc_t* coef) { return Vec(coef[r]); });
        }
      }
    });
  }
}

// Double lanes a run of products is summed in: independent partial sums the compiler keeps in vector registers,
// added in a fixed order at the end.
constexpr int64_t kLanes = 8;

// sum1[r] += sum of u, sum2[r] += sum of u * x over `len` buffered values.
template <typename acc_t>
void accumulate_run(const acc_t* u, const acc_t* x, int64_t len, double& sum1, double& sum2) {
  double l1[kLanes] = {}, l2[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const double d = static_cast<double>(u[j + l]);
      l1[l] += d;
      l2[l] += d * static_cast<double>(x[j + l]);
    }
  }
  for (int64_t l = 0; j + l < len; ++l) {
    const double d = static_cast<double>(u[j + l]);
    l1[l] += d;
    l2[l] += d * static_cast<double>(x[j + l]);
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum1 += l1[l];
    sum2 += l2[l];
  }
}

// Per-row sums of u and of u * x into args.sum1 and args.sum2, u(xv, k, count, coef) a vector function of the
// elements' x values (as in for_each_vector). Each run of elements has u and x buffered in acc_t, then summed in
// double. Channels-last, each task sums a block of pixels of one sample into its own partial rows, added up in a
// fixed order afterwards.
template <typename scalar_t, typename U>
void row_sums(const AffineCpuArgs<scalar_t>& a, const U& u) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = IO::kWidth;
  const AffineGeometry<int64_t>& g = a.g;
  std::fill(a.sum1, a.sum1 + g.N * g.C, 0.0);
  std::fill(a.sum2, a.sum2 + g.N * g.C, 0.0);
  if (g.N * g.C * g.S == 0) return;
  if (!g.channels_last) {
    constexpr int64_t kRun = 512;
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t b, int64_t e) {
      alignas(64) acc_t ub[kRun + W], xb[kRun + W];
      for (int64_t r = b; r < e; ++r) {
        const auto coef = [&](const acc_t* p) { return Vec(p[r]); };
        for (int64_t s0 = 0; s0 < g.S; s0 += kRun) {
          const int64_t len = std::min(kRun, g.S - s0), base = r * g.S + s0;
          for (int64_t j = 0; j < len; j += W) {
            const int64_t count = std::min(W, len - j);
            const Vec xv = IO::load(a.x + base + j, count);
            xv.store(xb + j);
            u(xv, base + j, count, coef).store(ub + j);
          }
          accumulate_run(ub, xb, len, a.sum1[r], a.sum2[r]);
        }
      }
    });
    return;
  }
  const int64_t block = std::max<int64_t>(grain_for(g.C), (g.S + 63) / 64);
  const int64_t blocks_per_n = (g.S + block - 1) / block;
  std::vector<double> partial(static_cast<size_t>(g.N * blocks_per_n * 2 * g.C), 0.0);
  at::parallel_for(0, g.N * blocks_per_n, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> ub(g.C + W), xb(g.C + W);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / blocks_per_n, s0 = task % blocks_per_n * block;
      const int64_t s_end = std::min(g.S, s0 + block), row0 = n * g.C;
      double* a1 = partial.data() + task * 2 * g.C;
      double* a2 = a1 + g.C;
      for (int64_t s = s0; s < s_end; ++s) {
        const int64_t base = (n * g.S + s) * g.C;
        for (int64_t c = 0; c < g.C; c += W) {
          const int64_t count = std::min(W, g.C - c);
          const auto coef = [&](const acc_t* p) { return Vec::loadu(p + row0 + c, count); };
          const Vec xv = IO::load(a.x + base + c, count);
          xv.store(xb.data() + c);
          u(xv, base + c, count, coef).store(ub.data() + c);
        }
        for (int64_t c = 0; c < g.C; ++c) {
          const double d = static_cast<double>(ub[c]);
          a1[c] += d;
          a2[c] += d * static_cast<double>(xb[c]);
        }
      }
    }
  });
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t j = 0; j < blocks_per_n; ++j) {
      const double* a1 = partial.data() + (n * blocks_per_n + j) * 2 * g.C;
      for (int64_t c = 0; c < g.C; ++c) {
        a.sum1[n * g.C + c] += a1[c];
        a.sum2[n * g.C + c] += a1[g.C + c];
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void channel_moments_kernel(const AffineCpuArgs<scalar_t>& a) {
  row_sums(a, [](const auto& xv, int64_t, int64_t, const auto&) { return xv; });
}

template <typename scalar_t>
void affine_act_kernel(const AffineCpuArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  dispatch_activation(a.act, [&]<Activation A>() {
    for_each_vector<scalar_t>(a.g, [&](int64_t k, int64_t count, const auto& coef) {
      IO::store(a.out + k, activate<A>(IO::load(a.x + k, count) * coef(a.scale) + coef(a.shift)), count);
    });
  });
}

template <typename scalar_t>
void affine_act_backward_reduce_kernel(const AffineCpuArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  dispatch_activation(a.act, [&]<Activation A>() {
    row_sums(a, [&](const auto& xv, int64_t k, int64_t count, const auto& coef) {
      return activation_grad<A>(IO::load(a.grad + k, count), xv * coef(a.scale) + coef(a.shift));
    });
  });
}

template <typename scalar_t>
void affine_act_backward_kernel(const AffineCpuArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  dispatch_activation(a.act, [&]<Activation A>() {
    for_each_vector<scalar_t>(a.g, [&](int64_t k, int64_t count, const auto& coef) {
      const auto xv = IO::load(a.x + k, count);
      const auto u = activation_grad<A>(IO::load(a.grad + k, count), xv * coef(a.scale) + coef(a.shift));
      IO::store(a.out + k, coef(a.coef_u) * u + coef(a.coef_x) * xv + coef(a.coef_1), count);
    });
  });
}

#define EPAMX_INSTANTIATE(scalar_t)                                                                  \
  template void channel_moments_kernel<scalar_t>(const AffineCpuArgs<scalar_t>& args);            \
  template void affine_act_kernel<scalar_t>(const AffineCpuArgs<scalar_t>& args);                 \
  template void affine_act_backward_reduce_kernel<scalar_t>(const AffineCpuArgs<scalar_t>& args); \
  template void affine_act_backward_kernel<scalar_t>(const AffineCpuArgs<scalar_t>& args);
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE)
#undef EPAMX_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace epamx
