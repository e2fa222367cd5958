// Attention reweighting, the vectorised CPU kernels, built once per instruction set (common/cpu_isa.h). They
// compute with attention_reweight_math.h's formulas on vectors of acc_t; a row's last, partial vector is loaded
// and stored short rather than handled by a scalar loop.
//
// NCTHW: a block of positions (whole frames of one sample, or a piece of one large frame) is one contiguous run
// in every channel, so the factors 1 + S*A of the block are computed once, and the channels then stream past
// them. NTHWC: every position's C channels are contiguous and share one factor.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "attention_reweight/attention_reweight_cpu_kernel.h"
#include "attention_reweight/attention_reweight_math.h"
#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"

namespace epamx {
namespace CPU_CAPABILITY {
namespace {

// factor[i * len + k] = 1 + S*A at position p0 + k of frame t0 + i of sample n.
template <typename scalar_t>
void block_factors(const ReweightCpuArgs<scalar_t>& g, int64_t n, int64_t t0, int64_t frames, int64_t p0,
                   int64_t len, at::opmath_type<scalar_t>* factor) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  for (int64_t i = 0; i < frames; ++i) {
    const int64_t frame = n * g.T + t0 + i;
    const Vec av(static_cast<typename IO::acc_t>(g.a[frame]));
    const scalar_t* s = g.s + frame * g.P + p0;
    for (int64_t k = 0; k < len; k += IO::kWidth) {
      const int64_t count = std::min(IO::kWidth, len - k);
      reweight_factor(IO::load(s + k, count), av).store(factor + i * len + k, count);
    }
  }
}

// Channels of a block processed per pass over its positions, each position's values held in registers meanwhile.
constexpr int64_t kChannelsPerPass = 4;

template <typename scalar_t>
void forward_nc(const ReweightCpuArgs<scalar_t>& g) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  at::parallel_for(0, g.N * g.T, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t factor[kBlock + IO::kWidth];
    for_each_block(begin, end, g.T, g.P, g.P, [&](int64_t n, int64_t t0, int64_t frames, int64_t p0, int64_t len) {
      block_factors(g, n, t0, frames, p0, len, factor);
      const int64_t run = frames * len;  // contiguous in every channel
      for (int64_t c0 = 0; c0 < g.C; c0 += kChannelsPerPass) {
        const int64_t base = ((n * g.C + c0) * g.T + t0) * g.P + p0, channels = std::min(kChannelsPerPass, g.C - c0);
        const auto positions = [&](int64_t k, int64_t count) {
          const Vec f = Vec::loadu(factor + k);
          for (int64_t c = 0; c < channels; ++c) {
            const int64_t at = base + c * g.T * g.P + k;
            if (count == IO::kWidth) {
              IO::store(g.out + at, IO::load(g.x + at) * f);
            } else {
              IO::store(g.out + at, IO::load(g.x + at, count) * f, count);
            }
          }
        };
        int64_t k = 0;
        for (; k + IO::kWidth <= run; k += IO::kWidth) positions(k, IO::kWidth);
        if (k < run) positions(k, run - k);
      }
    });
  });
}

template <typename scalar_t>
void backward_nc(const ReweightCpuArgs<scalar_t>& g) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  at::parallel_for(0, g.N * g.T, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t factor[kBlock + IO::kWidth];
    alignas(64) acc_t gx[kBlock + IO::kWidth];  // sum over channels of g*x at each position of the block
    acc_t da_sum = 0;                           // dA of the frame so far, carried over a large frame's pieces
    for_each_block(begin, end, g.T, g.P, g.P, [&](int64_t n, int64_t t0, int64_t frames, int64_t p0, int64_t len) {
      block_factors(g, n, t0, frames, p0, len, factor);
      const int64_t run = frames * len;
      std::fill_n(gx, run + IO::kWidth, acc_t(0));
      for (int64_t c0 = 0; c0 < g.C; c0 += kChannelsPerPass) {
        const int64_t base = ((n * g.C + c0) * g.T + t0) * g.P + p0, channels = std::min(kChannelsPerPass, g.C - c0);
        const auto positions = [&](int64_t k, int64_t count) {
          const Vec f = Vec::loadu(factor + k);
          Vec sum = Vec::loadu(gx + k);  // channels added in order, as the math's loop adds them
          for (int64_t c = 0; c < channels; ++c) {
            const int64_t at = base + c * g.T * g.P + k;
            if (count == IO::kWidth) {
              const Vec gv = IO::load(g.grad + at);
              IO::store(g.out + at, gv * f);
              sum = sum + gv * IO::load(g.x + at);
            } else {
              const Vec gv = IO::load(g.grad + at, count);
              IO::store(g.out + at, gv * f, count);
              sum = sum + gv * IO::load(g.x + at, count);
            }
          }
          sum.store(gx + k);
        };
        int64_t k = 0;
        for (; k + IO::kWidth <= run; k += IO::kWidth) positions(k, IO::kWidth);
        if (k < run) positions(k, run - k);
      }
      for (int64_t i = 0; i < frames; ++i) {
        const int64_t frame = n * g.T + t0 + i;
        const Vec av(static_cast<acc_t>(g.a[frame]));
        const scalar_t* s = g.s + frame * g.P + p0;
        scalar_t* ds = g.ds + frame * g.P + p0;
        Vec terms(0);
        for (int64_t k = 0; k < len; k += IO::kWidth) {
          const int64_t count = std::min(IO::kWidth, len - k);
          const Vec sum = Vec::loadu(gx + i * len + k);
          IO::store(ds + k, reweight_grad_spatial(av, sum), count);
          terms = terms + Vec::set(Vec(0), reweight_grad_temporal_term(sum, IO::load(s + k, count)), count);
        }
        if (p0 == 0) da_sum = 0;
        da_sum += sum_lanes(terms);
        if (p0 + len == g.P) g.da[frame] = static_cast<scalar_t>(da_sum);
      }
    });
  });
}

template <typename scalar_t>
void forward_nthwc(const ReweightCpuArgs<scalar_t>& g) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  at::parallel_for(0, g.N * g.T, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    for (int64_t frame = begin; frame < end; ++frame) {
      const Vec av(static_cast<acc_t>(g.a[frame]));
      for (int64_t p = 0; p < g.P; ++p) {
        const Vec factor = reweight_factor(Vec(static_cast<acc_t>(g.s[frame * g.P + p])), av);
        const scalar_t* x = g.x + (frame * g.P + p) * g.C;
        scalar_t* out = g.out + (frame * g.P + p) * g.C;
        int64_t c = 0;
        for (; c + IO::kWidth <= g.C; c += IO::kWidth) IO::store(out + c, IO::load(x + c) * factor);
        if (c < g.C) IO::store(out + c, IO::load(x + c, g.C - c) * factor, g.C - c);
      }
    }
  });
}

template <typename scalar_t>
void backward_nthwc(const ReweightCpuArgs<scalar_t>& g) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  at::parallel_for(0, g.N * g.T, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    for (int64_t frame = begin; frame < end; ++frame) {
      const acc_t av = static_cast<acc_t>(g.a[frame]);
      // dA adds one term a position, in order: in double, or a float sum over a large frame (61 x 67 pixels of
      // 3 channels) drifts ~1e-5 relative from the exact sum, 30x the GPU's tree (one add a position costs nothing
      // beside the position's channels).
      double da_sum = 0;
      for (int64_t p = 0; p < g.P; ++p) {
        const acc_t sv = static_cast<acc_t>(g.s[frame * g.P + p]);
        const Vec factor = reweight_factor(Vec(sv), Vec(av));
        const int64_t base = (frame * g.P + p) * g.C;
        const scalar_t *grad = g.grad + base, *x = g.x + base;
        scalar_t* dx = g.out + base;
        Vec gx(0);
        int64_t c = 0;
        for (; c + IO::kWidth <= g.C; c += IO::kWidth) {
          const Vec gv = IO::load(grad + c);
          IO::store(dx + c, gv * factor);
          gx = gx + gv * IO::load(x + c);
        }
        if (c < g.C) {
          const Vec gv = IO::load(grad + c, g.C - c);
          IO::store(dx + c, gv * factor, g.C - c);
          gx = Vec::set(gx, gx + gv * IO::load(x + c, g.C - c), g.C - c);
        }
        const acc_t sum = sum_lanes(gx);
        g.ds[frame * g.P + p] = static_cast<scalar_t>(reweight_grad_spatial(av, sum));
        da_sum += reweight_grad_temporal_term(sum, sv);
      }
      g.da[frame] = static_cast<scalar_t>(da_sum);
    }
  });
}

}  // namespace

template <typename scalar_t>
void attention_reweight_forward_kernel(const ReweightCpuArgs<scalar_t>& args) {
  if (args.channels_last) {
    forward_nthwc(args);
  } else {
    forward_nc(args);
  }
}

template <typename scalar_t>
void attention_reweight_backward_kernel(const ReweightCpuArgs<scalar_t>& args) {
  if (args.channels_last) {
    backward_nthwc(args);
  } else {
    backward_nc(args);
  }
}

#define EPAMX_INSTANTIATE(scalar_t)                                                                      \
  template void attention_reweight_forward_kernel<scalar_t>(const ReweightCpuArgs<scalar_t>& args); \
  template void attention_reweight_backward_kernel<scalar_t>(const ReweightCpuArgs<scalar_t>& args);
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE)
#undef EPAMX_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace epamx
