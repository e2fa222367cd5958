#pragma once
// Batch norm + activation: argument checks and layout decisions shared by the CPU and CUDA front ends.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "batch_norm_act/batch_norm_act_math.h"
#include "common/checks.h"

namespace epamx {

// Channels-last (C innermost, the rest dense) for a 4-D or 5-D tensor in that memory format, else contiguous.
inline bool affine_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  return (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) ||
         (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

inline at::MemoryFormat affine_memory_format(bool channels_last, int64_t dim) {
  if (!channels_last) return at::MemoryFormat::Contiguous;
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// x in the layout the kernels read: as it is when channels-last or contiguous, else a contiguous copy.
inline at::Tensor affine_input(const at::Tensor& x) {
  return affine_channels_last(x) ? x : x.contiguous();
}

// `t` in the memory layout of `like` (the kernels index grad and x with the same offsets).
inline at::Tensor affine_same_layout(const at::Tensor& t, const at::Tensor& like, bool channels_last) {
  return t.contiguous(affine_memory_format(channels_last, like.dim()));
}

// The operands as every device's kernels read them: x as affine_input gives it, grad in x's layout, scale and
// shift contiguous; grad, scale and shift stay undefined where the op has none.
struct AffineOperands {
  at::Tensor x, grad, scale, shift;
  bool channels_last;

  // Options of an elementwise output (affine_act's result, dx): x's, in the layout the kernels write.
  at::TensorOptions output_options() const {
    return x.options().memory_format(affine_memory_format(channels_last, x.dim()));
  }
};

inline AffineOperands affine_operands(const at::Tensor& x_in, const at::Tensor* grad_in, const at::Tensor& scale_in,
                                      const at::Tensor& shift_in) {
  AffineOperands in;
  in.x = affine_input(x_in);
  in.channels_last = affine_channels_last(in.x);
  if (grad_in) in.grad = affine_same_layout(*grad_in, in.x, in.channels_last);
  if (scale_in.defined()) in.scale = scale_in.contiguous();
  if (shift_in.defined()) in.shift = shift_in.contiguous();
  return in;
}

template <typename index_t>
AffineGeometry<index_t> affine_geometry(const at::Tensor& x, bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = N * C == 0 ? 0 : x.numel() / (N * C);
  return {static_cast<index_t>(N), static_cast<index_t>(C), static_cast<index_t>(S), channels_last};
}

// The GPU row reductions' work split (batch_norm_act_math.h, RowReducePlan) for x's geometry g, N * C and S > 0: a
// function of the shape alone, so that the sums are grouped the same way on every run and every GPU. Pass 1 cuts
// rows into slices until its blocks reach kRowReduceTargetBlocks (about two waves of 8 resident blocks per SM on
// an H100's 132 SMs or an A100's 108: enough to keep every SM's loads in flight) while each lane still reads at
// least kRowReduceMinSteps elements (so the block's lane tree, eight barriers at most, stays small beside its
// loads). split_rows false: one slice per row (pass 2, over the partial sums).
constexpr int64_t kRowReduceTargetBlocks = 2048;
constexpr int64_t kRowReduceMinSteps = 16;

template <typename index_t>
RowReducePlan<index_t> row_reduce_plan(const AffineGeometry<index_t>& g, bool split_rows) {
  constexpr int64_t threads = kRowReduceThreads;
  const int64_t N = g.N, C = g.C, S = g.S;
  TORCH_INTERNAL_ASSERT(N * C > 0 && S > 0);
  int64_t items, lanes, channel_tiles = 1, tiles;
  if (g.channels_last) {
    // A sample's C channels in as few tiles as the block's threads allow, of near-equal width; the lanes take what
    // threads are left (C = 54: 4 lanes of 54 channels, 216 threads reading 216 consecutive elements a step).
    channel_tiles = (C + threads - 1) / threads;
    items = (C + channel_tiles - 1) / channel_tiles;
    lanes = threads / items;
    tiles = N * channel_tiles;
  } else {
    // A row's S elements over the whole block, or several short rows per block (S = 49: 5 rows of 49 lanes).
    lanes = std::min(S, threads);
    items = threads / lanes;
    tiles = (N * C + items - 1) / items;
  }
  const int64_t steps_total = (S + lanes - 1) / lanes;  // elements per lane over a whole row
  int64_t splits = 1;
  if (split_rows) {
    splits = std::clamp<int64_t>((kRowReduceTargetBlocks + tiles - 1) / tiles, 1,
                                 std::max<int64_t>(1, steps_total / kRowReduceMinSteps));
  }
  const int64_t steps = (steps_total + splits - 1) / splits;
  splits = (steps_total + steps - 1) / steps;  // no empty slice
  TORCH_INTERNAL_ASSERT(items * lanes <= threads && splits * steps * lanes >= S && (splits - 1) * steps * lanes < S);
  const auto i = [](int64_t v) { return static_cast<index_t>(v); };
  return {i(items), i(lanes), i(g.channels_last ? items : 1), i(channel_tiles), i(tiles), i(steps), i(splits)};
}

inline void check_affine_input(const at::Tensor& x, const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be (N, C, ...) with at least 2 dims, got shape ", x.sizes());
}

inline void check_activation(int64_t act, const char* op) {
  TORCH_CHECK_VALUE(act >= 0 && act <= 2, op, ": activation must be 0 (identity), 1 (ReLU) or 2 (SiLU), got ", act);
}

// A per-row coefficient: (N, C), in x's accumulation dtype (float32 for float16/bfloat16/float32, float64 for
// float64), on x's device.
inline void check_coefficient(const at::Tensor& coef, const at::Tensor& x, const char* op, const char* arg) {
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK_TYPE(coef.scalar_type() == acc, op, ": ", arg, " must be ", acc, " for a ", x.scalar_type(),
                   " x, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == x.size(0) && coef.size(1) == x.size(1), op, ": ", arg,
                    " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", coef.sizes());
  check_same_device(coef, arg, x, "x", op);
}

inline void check_affine_grad(const at::Tensor& grad, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ", x.scalar_type(),
                   ", got ", grad.scalar_type());
  check_same_device(grad, "grad", x, "x", op);
}

// The arguments every affine_act op takes, checked in the same order on every device: x, the incoming gradient
// (backward ops only, else nullptr), the per-row scale and shift.
inline void check_affine_args(const at::Tensor& x, const at::Tensor* grad, const at::Tensor& scale,
                              const at::Tensor& shift, const char* op) {
  check_affine_input(x, op);
  if (grad) check_affine_grad(*grad, x, op);
  check_coefficient(scale, x, op, "scale");
  check_coefficient(shift, x, op, "shift");
}

// Test hooks, CPU only. batch_norm_act_run_thread_bodies runs the CUDA kernels' bodies, with the index type the
// CUDA launcher picks for x. kind 1: affine_act -> (out,), and 3: the backward -> (dx,), one thread per element in
// the order `order` (a permutation of 0..numel-1); kind 0: the moments -> (sum, sumsq), and 2: the backward
// reduction -> (sum_u, sum_ux), the two passes of row_reduce_kernel, pass 1's blocks in the order `order` (a
// permutation of 0..tiles*splits-1), each block's threads in descending order. batch_norm_act_reduce_plan: the
// reductions' RowReducePlan for x, as (items, lanes, channel_tiles, tiles, steps, splits).
std::vector<int64_t> batch_norm_act_reduce_plan(const at::Tensor& x);

std::vector<at::Tensor> batch_norm_act_run_thread_bodies(int64_t kind, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& grad,
                                                         const std::optional<at::Tensor>& scale,
                                                         const std::optional<at::Tensor>& shift,
                                                         const std::optional<at::Tensor>& coef_u,
                                                         const std::optional<at::Tensor>& coef_x,
                                                         const std::optional<at::Tensor>& coef_1, int64_t act,
                                                         const at::Tensor& order);

}  // namespace epamx
