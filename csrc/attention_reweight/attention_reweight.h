#pragma once
// Attention reweighting: argument checks shared by the CPU and CUDA front ends.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "attention_reweight/attention_reweight_math.h"
#include "common/checks.h"

namespace epamx {

// Checks x (N, C, T, H, W), spatial (N, 1, T, H, W) and temporal (N, 1, T, 1, 1): one dtype, one device.
inline void check_reweight_args(const at::Tensor& x, const at::Tensor& spatial, const at::Tensor& temporal,
                                const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": x must be 5-D (N, C, T, H, W), got shape ", x.sizes());
  const int64_t N = x.size(0), T = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK_VALUE(spatial.dim() == 5 && spatial.size(0) == N && spatial.size(1) == 1 && spatial.size(2) == T &&
                        spatial.size(3) == H && spatial.size(4) == W,
                    op, ": spatial must have shape (N, 1, T, H, W) = (", N, ", 1, ", T, ", ", H, ", ", W,
                    ") to match x, got ", spatial.sizes());
  TORCH_CHECK_VALUE(temporal.dim() == 5 && temporal.size(0) == N && temporal.size(1) == 1 && temporal.size(2) == T &&
                        temporal.size(3) == 1 && temporal.size(4) == 1,
                    op, ": temporal must have shape (N, 1, T, 1, 1) = (", N, ", 1, ", T, ", 1, 1) to match x, got ",
                    temporal.sizes());
  TORCH_CHECK_TYPE(spatial.scalar_type() == x.scalar_type() && temporal.scalar_type() == x.scalar_type(), op,
                   ": spatial and temporal must have x's dtype ", x.scalar_type(), ", got ", spatial.scalar_type(),
                   " and ", temporal.scalar_type(), " (epamx.ops.attention_reweight casts them for you)");
  check_same_device(x, "x", spatial, "spatial", op);
  check_same_device(x, "x", temporal, "temporal", op);
}

inline void check_reweight_grad(const at::Tensor& grad, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ", x.scalar_type(),
                   ", got ", grad.scalar_type());
  check_same_device(grad, "grad", x, "x", op);
}

template <typename index_t>
ReweightGeometry<index_t> reweight_geometry(const at::Tensor& x) {
  return {static_cast<index_t>(x.size(0)), static_cast<index_t>(x.size(1)), static_cast<index_t>(x.size(2)),
          static_cast<index_t>(x.size(3) * x.size(4))};
}

// Test hook, CPU only: runs the CUDA backward kernels' per-thread bodies with `groups` channel groups, the first
// step's threads in `order1` and the second step's (one per frame) in `order2`. Returns (dx, dS, dA). A
// channels_last_3d x takes the NTHWC kernels' bodies: one group, order1 then lists the positions' teams, each team's
// lanes run in descending order and are added by team_butterfly, and dx is channels_last_3d.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_reweight_backward_run_thread_bodies(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& spatial, const at::Tensor& temporal,
    int64_t groups, const at::Tensor& order1, const at::Tensor& order2);

}  // namespace epamx
