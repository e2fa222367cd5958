// Channel pooling, the vectorised CPU kernels, built once per instruction set (common/cpu_isa.h). The maximum and
// arg-max follow channel_pool_math.h's rules (pool_max_step, pool_takes_max) lane by lane, the mean is the sum in
// acc_t times 1/C; a row's last, partial vector is loaded and stored short rather than handled by a scalar loop.
//
// NCTHW: a block of pooled positions (whole output frames of one sample, or a piece of one large frame) keeps its
// running maximum and sum (or arg-max) on the stack while the channels stream past, each read in memory order.
// The backward pass finds every pooled position's arg-max and sorts each sample's positions by it; dx[n, c] is
// then the sample's T frames of mean gradient / C (zeros at the frames between pooled ones) with the arg-max
// positions of channel c put in, assembled in cache and streamed out in memory order. NTHWC: the C channels of a
// position are one contiguous row, reduced along the row in the vector's lanes and then across them.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "channel_pool/channel_pool_cpu_kernel.h"
#include "channel_pool/channel_pool_math.h"
#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"

namespace epamx {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
struct PoolVec {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using index_t = PoolCpuIndex<scalar_t>;
  using IndexVec = at::vec::Vectorized<index_t>;
  static_assert(IndexVec::size() == Vec::size(), "one channel number per lane of acc_t");
  static constexpr int64_t kWidth = IO::kWidth;

  // pool_max_step, lane by lane.
  static Vec max_step(const Vec& best, const Vec& v) { return Vec::blendv(best, v, (v > best) | (v != v)); }
  // pool_takes_max, lane by lane: all bits set where v takes over.
  static Vec takes_max(const Vec& v, const Vec& best) { return (v > best) | ((v != v) & (best == best)); }
  // Channel numbers carried bit for bit in acc_t lanes, so that the blend that moves a value moves its channel.
  static Vec channel_bits(const IndexVec& c) { return at::vec::cast<acc_t>(c); }
  static Vec lowest() { return Vec(-std::numeric_limits<acc_t>::infinity()); }
};

int64_t round_up(int64_t v, int64_t multiple) { return (v + multiple - 1) / multiple * multiple; }

// Where a block of pooled positions sits in x and in the block's stack arrays. Frame i of the block is row i, of
// len positions, at i * row_pad in the arrays; with t_stride 1 and whole frames, the frames are one row instead
// (consecutive in x too).
struct BlockRows {
  int64_t rows, row_len, row_pad;

  BlockRows(int64_t t_stride, int64_t P, int64_t frames, int64_t len, int64_t width) {
    const bool merged = t_stride == 1 && len == P;
    rows = merged ? 1 : frames;
    row_len = merged ? frames * len : len;
    row_pad = round_up(row_len, width);
  }
  // Where frame i's positions start in the arrays.
  int64_t frame_offset(int64_t i, int64_t len) const { return rows == 1 ? i * len : i * row_pad; }
};

// The values per frame a block keeps: for_each_block's footprint.
int64_t block_footprint(int64_t t_stride, int64_t P, int64_t width) {
  return t_stride == 1 ? P : round_up(P, width);
}

// Channels applied to a block's running values per load and store of them.
constexpr int64_t kChannelsPerPass = 8;

// Over all channels at the block's positions (output frames t0 .. t0 + frames - 1 of sample n, positions
// [p0, p0 + len) of each): the maximum, and the sum, or with kArg instead the arg-max (as channel bits).
// Channels are applied in order, so the maximum, arg-max and sum are those of the sequential loops of the math.
template <bool kArg, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void scan_block_nc(const PoolCpuArgs<scalar_t>& g, int64_t n, int64_t t0, const BlockRows& block, int64_t p0,
                   acc_t* best, acc_t* sum, acc_t* arg_bits) {
  using V = PoolVec<scalar_t>;
  using Vec = typename V::Vec;
  using IO = typename V::IO;
  const int64_t channel_stride = g.T * g.P;
  const auto bits = [](int64_t c) {
    return V::channel_bits(typename V::IndexVec(static_cast<typename V::index_t>(c)));
  };
  for (int64_t c0 = 0; c0 < g.C; c0 += kChannelsPerPass) {
    const int64_t c1 = std::min(g.C, c0 + kChannelsPerPass);
    for (int64_t r = 0; r < block.rows; ++r) {
      const scalar_t* x = g.x + ((n * g.C + c0) * g.T + (t0 + r) * g.t_stride) * g.P + p0;
      const int64_t at = r * block.row_pad;
      for (int64_t k = 0; k < block.row_len; k += V::kWidth) {
        const int64_t count = std::min(V::kWidth, block.row_len - k);
        const auto load = [&](int64_t c) {
          const scalar_t* xc = x + (c - c0) * channel_stride + k;
          return count == V::kWidth ? IO::load(xc) : IO::load(xc, count);
        };
        Vec b, s, a;
        int64_t c = c0;
        if (c0 == 0) {  // the first channel starts the running values
          b = load(0);
          if constexpr (kArg) {
            a = bits(0);
          } else {
            s = b;
          }
          c = 1;
        } else {
          b = Vec::loadu(best + at + k);
          if constexpr (kArg) {
            a = Vec::loadu(arg_bits + at + k);
          } else {
            s = Vec::loadu(sum + at + k);
          }
        }
        for (; c < c1; ++c) {
          const Vec v = load(c);
          if constexpr (kArg) {
            const Vec takes = V::takes_max(v, b);
            b = Vec::blendv(b, v, takes);
            a = Vec::blendv(a, bits(c), takes);
          } else {
            b = V::max_step(b, v);
            s = s + v;
          }
        }
        b.store(best + at + k);
        if constexpr (kArg) {
          a.store(arg_bits + at + k);
        } else {
          s.store(sum + at + k);
        }
      }
    }
  }
}

template <typename scalar_t>
void forward_nc(const PoolCpuArgs<scalar_t>& g) {
  using V = PoolVec<scalar_t>;
  using acc_t = typename V::acc_t;
  using Vec = typename V::Vec;
  using IO = typename V::IO;
  const Vec inv_c(acc_t(1) / static_cast<acc_t>(g.C));
  at::parallel_for(0, g.N * g.T_out, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t best[kBlock + V::kWidth];
    alignas(64) acc_t sum[kBlock + V::kWidth];
    const int64_t footprint = block_footprint(g.t_stride, g.P, V::kWidth);
    for_each_block(begin, end, g.T_out, g.P, footprint, [&](int64_t n, int64_t t0, int64_t frames, int64_t p0,
                                                            int64_t len) {
      const BlockRows block(g.t_stride, g.P, frames, len, V::kWidth);
      scan_block_nc<false>(g, n, t0, block, p0, best, sum, static_cast<acc_t*>(nullptr));
      for (int64_t i = 0; i < frames; ++i) {
        const int64_t at = block.frame_offset(i, len);
        // NCTHW's output is NCTHW too: its positions are contiguous.
        scalar_t* max_out = g.out + n * g.pooled_stride_n + (t0 + i) * g.pooled_stride_t + p0;
        scalar_t* mean_out = max_out + g.pooled_stride_c;
        for (int64_t k = 0; k < len; k += V::kWidth) {
          const int64_t count = std::min(V::kWidth, len - k);
          IO::store(max_out + k, Vec::loadu(best + at + k), count);
          IO::store(mean_out + k, Vec::loadu(sum + at + k) * inv_c, count);
        }
      }
    });
  });
}

template <typename scalar_t>
void backward_nc(const PoolCpuArgs<scalar_t>& g) {
  using V = PoolVec<scalar_t>;
  using acc_t = typename V::acc_t;
  using Vec = typename V::Vec;
  using index_t = typename V::index_t;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  const int64_t pooled_per_sample = g.T_out * g.P;
  // The arg-max of every pooled position, and each sample's dx frames and values at the arg-max.
  at::parallel_for(0, g.N * g.T_out, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t best[kBlock + V::kWidth];
    alignas(64) acc_t arg_bits[kBlock + V::kWidth];
    const int64_t footprint = block_footprint(g.t_stride, g.P, V::kWidth);
    for_each_block(begin, end, g.T_out, g.P, footprint, [&](int64_t n, int64_t t0, int64_t frames, int64_t p0,
                                                            int64_t len) {
      const BlockRows block(g.t_stride, g.P, frames, len, V::kWidth);
      scan_block_nc<true>(g, n, t0, block, p0, best, static_cast<acc_t*>(nullptr), arg_bits);
      for (int64_t i = 0; i < frames; ++i) {
        const int64_t t_out = t0 + i, t = t_out * g.t_stride, at = block.frame_offset(i, len);
        const int64_t pooled = (n * g.T_out + t_out) * g.P + p0;
        for (int64_t k = 0; k < len; k += V::kWidth) {
          Vec::loadu(arg_bits + at + k).store(static_cast<void*>(g.arg + pooled + k), std::min(V::kWidth, len - k));
        }
        const scalar_t* grad = g.grad + n * g.pooled_stride_n + t_out * g.pooled_stride_t;
        scalar_t* frame_dx = g.sample_dx + (n * g.T + t) * g.P;
        for (int64_t k = 0; k < len; ++k) {
          const scalar_t* grad_p = grad + (p0 + k) * g.pooled_stride_p;
          const acc_t grad_max = static_cast<acc_t>(grad_p[0]);
          const acc_t mean = static_cast<acc_t>(grad_p[g.pooled_stride_c]) * inv_c;
          // pool_input_grad for the channels other than the arg-max, and for the arg-max
          frame_dx[p0 + k] = static_cast<scalar_t>(mean);
          g.at_arg[pooled + k] = static_cast<scalar_t>(grad_max + mean);
        }
        if (p0 + len == g.P) {  // the frames up to the next pooled one get no gradient
          const int64_t skipped = std::min(g.T, t + g.t_stride) - t - 1;
          std::memset(static_cast<void*>(frame_dx + g.P), 0, skipped * g.P * sizeof(scalar_t));
        }
      }
    });
  });
  // Each sample's pooled positions sorted by arg-max channel (a counting sort).
  at::parallel_for(0, g.N, grain_for(pooled_per_sample + g.C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const index_t* arg = g.arg + n * pooled_per_sample;
      int64_t* bucket = g.bucket_end + n * g.C;
      std::fill_n(bucket, g.C, int64_t(0));
      for (int64_t q = 0; q < pooled_per_sample; ++q) ++bucket[arg[q]];
      for (int64_t c = 0, start = 0; c < g.C; ++c) {  // counts -> starts
        const int64_t count = bucket[c];
        bucket[c] = start;
        start += count;
      }
      int64_t* by_channel = g.by_channel + n * pooled_per_sample;
      for (int64_t q = 0; q < pooled_per_sample; ++q) by_channel[bucket[arg[q]]++] = q;  // starts -> ends
    }
  });
  // dx in memory order, (n, c) by (n, c), kBlock elements at a time: the sample's frames, with the values at the
  // channel's arg-max positions put in, assembled in cache and streamed out.
  at::parallel_for(0, g.N * g.C, grain_for(g.T * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t piece[kBlock];
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / g.C, c = nc % g.C, run = g.T * g.P;
      const scalar_t* frames = g.sample_dx + n * run;
      const int64_t* bucket = g.bucket_end + n * g.C;
      const int64_t* by_channel = g.by_channel + n * pooled_per_sample;
      const scalar_t* at_arg = g.at_arg + n * pooled_per_sample;
      int64_t i = c == 0 ? 0 : bucket[c - 1];
      for (int64_t j0 = 0; j0 < run; j0 += kBlock) {
        const int64_t len = std::min(kBlock, run - j0);
        copy_elements(piece, frames + j0, len);
        for (; i < bucket[c]; ++i) {  // in increasing order of position
          const int64_t q = by_channel[i], j = q / g.P * g.t_stride * g.P + q % g.P;
          if (j >= j0 + len) break;
          piece[j - j0] = at_arg[q];
        }
        stream_elements(g.dx + nc * run + j0, piece, len);
      }
    }
    stream_fence();
  });
}

template <typename scalar_t>
void forward_nthwc(const PoolCpuArgs<scalar_t>& g) {
  using V = PoolVec<scalar_t>;
  using acc_t = typename V::acc_t;
  using Vec = typename V::Vec;
  using IO = typename V::IO;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  at::parallel_for(0, g.N * g.T_out, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t lanes[V::kWidth];
    for (int64_t f = begin; f < end; ++f) {
      const int64_t n = f / g.T_out, t_out = f % g.T_out;
      const scalar_t* xf = g.x + (n * g.T + t_out * g.t_stride) * g.P * g.C;
      scalar_t* max_out = g.out + n * g.pooled_stride_n + t_out * g.pooled_stride_t;
      for (int64_t p = 0; p < g.P; ++p) {
        const scalar_t* x = xf + p * g.C;
        Vec best = V::lowest(), sum(0);
        int64_t c = 0;
        for (; c + V::kWidth <= g.C; c += V::kWidth) {
          const Vec v = IO::load(x + c);
          best = V::max_step(best, v);
          sum = sum + v;
        }
        if (c < g.C) {
          const Vec v = IO::load(x + c, g.C - c);
          best = Vec::set(best, V::max_step(best, v), g.C - c);
          sum = Vec::set(sum, sum + v, g.C - c);
        }
        best.store(lanes);
        acc_t max = lanes[0];
        for (int64_t l = 1; l < V::kWidth; ++l) max = pool_max_step(max, lanes[l]);
        max_out[p * g.pooled_stride_p] = static_cast<scalar_t>(max);
        max_out[p * g.pooled_stride_p + g.pooled_stride_c] = static_cast<scalar_t>(sum_lanes(sum) * inv_c);
      }
    }
  });
}

template <typename scalar_t>
void backward_nthwc(const PoolCpuArgs<scalar_t>& g) {
  using V = PoolVec<scalar_t>;
  using acc_t = typename V::acc_t;
  using Vec = typename V::Vec;
  using IO = typename V::IO;
  using index_t = typename V::index_t;
  using IndexVec = typename V::IndexVec;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  at::parallel_for(0, g.N * g.T, grain_for(g.C * g.P), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t lane_best[V::kWidth];
    alignas(64) index_t lane_arg[V::kWidth];
    const IndexVec lane = IndexVec::arange(0, 1);
    for (int64_t f = begin; f < end; ++f) {
      const int64_t n = f / g.T, t = f % g.T;
      scalar_t* dxf = g.dx + f * g.P * g.C;
      if (t % g.t_stride != 0) {
        std::memset(static_cast<void*>(dxf), 0, g.P * g.C * sizeof(scalar_t));
        continue;
      }
      const scalar_t* xf = g.x + f * g.P * g.C;
      const scalar_t* grad = g.grad + n * g.pooled_stride_n + t / g.t_stride * g.pooled_stride_t;
      for (int64_t p = 0; p < g.P; ++p) {
        // Each lane keeps the first arg-max among its channels; the first arg-max overall is then the lowest
        // channel among the lanes that hold the maximum.
        const scalar_t* x = xf + p * g.C;
        Vec best = V::lowest(), arg_bits = V::channel_bits(IndexVec(0));
        for (int64_t c = 0; c < g.C; c += V::kWidth) {
          const int64_t count = std::min(V::kWidth, g.C - c);
          const Vec v = count == V::kWidth ? IO::load(x + c) : IO::load(x + c, count);
          const Vec takes = V::takes_max(v, best);
          const Vec channels = V::channel_bits(IndexVec(static_cast<index_t>(c)) + lane);
          best = Vec::set(best, Vec::blendv(best, v, takes), count);
          arg_bits = Vec::set(arg_bits, Vec::blendv(arg_bits, channels, takes), count);
        }
        best.store(lane_best);
        arg_bits.store(static_cast<void*>(lane_arg));
        acc_t max = lane_best[0];
        index_t arg = lane_arg[0];
        for (int64_t l = 1; l < V::kWidth; ++l) {
          const acc_t v = lane_best[l];
          const bool tie = v == max || (v != v && max != max);
          if (pool_takes_max(v, max) || (tie && lane_arg[l] < arg)) {
            max = v;
            arg = lane_arg[l];
          }
        }
        const acc_t grad_max = static_cast<acc_t>(grad[p * g.pooled_stride_p]);
        const acc_t mean = static_cast<acc_t>(grad[p * g.pooled_stride_p + g.pooled_stride_c]) * inv_c;
        scalar_t* dx = dxf + p * g.C;
        const Vec mean_v(mean);
        int64_t c = 0;
        for (; c + V::kWidth <= g.C; c += V::kWidth) IO::store(dx + c, mean_v);
        if (c < g.C) IO::store(dx + c, mean_v, g.C - c);
        dx[arg] = static_cast<scalar_t>(grad_max + mean);  // pool_input_grad at the arg-max
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void channel_pool_forward_kernel(const PoolCpuArgs<scalar_t>& args) {
  if (args.channels_last) {
    forward_nthwc(args);
  } else {
    forward_nc(args);
  }
}

template <typename scalar_t>
void channel_pool_backward_kernel(const PoolCpuArgs<scalar_t>& args) {
  if (args.channels_last) {
    backward_nthwc(args);
  } else {
    backward_nc(args);
  }
}

#define EPAMX_INSTANTIATE(scalar_t)                                                           \
  template void channel_pool_forward_kernel<scalar_t>(const PoolCpuArgs<scalar_t>& args); \
  template void channel_pool_backward_kernel<scalar_t>(const PoolCpuArgs<scalar_t>& args);
EPAMX_FOR_EACH_FLOATING_TYPE(EPAMX_INSTANTIATE)
#undef EPAMX_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace epamx
