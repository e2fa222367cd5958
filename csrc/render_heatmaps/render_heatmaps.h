#pragma once
// render_heatmaps: argument checks and the render geometry, shared by the CPU and CUDA front ends.
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "render_heatmaps/render_heatmaps_math.h"

namespace epamx {

// What the checks found out about a render call.
struct RenderArgs {
  int64_t N, M, T, V, L, C, H, W;
  bool with_joints;
  at::ScalarType out_dtype;
  std::vector<int32_t> limbs;  // flattened (L, 2) joint pairs
};

inline RenderArgs check_render_args(const at::Tensor& keypoints, const std::optional<at::Tensor>& scores,
                                    c10::IntArrayRef size, double sigma, at::OptionalIntArrayRef limbs,
                                    bool with_joints, std::optional<at::ScalarType> dtype, const char* op) {
  check_floating(keypoints, op, "keypoints");
  TORCH_CHECK_VALUE(keypoints.dim() == 5 && keypoints.size(4) == 2, op,
                    ": keypoints must be 5-D (N, M, T, V, 2) with (x, y) in heatmap pixels, got shape ",
                    keypoints.sizes());
  RenderArgs a{};
  a.N = keypoints.size(0);
  a.M = keypoints.size(1);
  a.T = keypoints.size(2);
  a.V = keypoints.size(3);
  if (scores.has_value()) {
    check_floating(*scores, op, "scores");
    check_same_device(keypoints, "keypoints", *scores, "scores", op);
    TORCH_CHECK_VALUE(scores->dim() == 4 && scores->sizes() == keypoints.sizes().slice(0, 4), op,
                      ": scores must have shape (N, M, T, V) = ", keypoints.sizes().slice(0, 4),
                      " to match keypoints, got ", scores->sizes());
  }
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] >= 1 && size[1] >= 1, op,
                    ": size must be (H, W) with H >= 1 and W >= 1, got ", size);
  TORCH_CHECK_VALUE(size[0] <= std::numeric_limits<int32_t>::max() && size[1] <= std::numeric_limits<int32_t>::max(),
                    op, ": size must fit in int32, got ", size);
  a.H = size[0];
  a.W = size[1];
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, op, ": sigma must be a finite number > 0, got ", sigma);
  if (limbs.has_value()) {
    const auto pairs = *limbs;
    TORCH_CHECK_VALUE(pairs.size() % 2 == 0, op, ": limbs must be joint pairs flattened to ",
                      "(start0, end0, start1, end1, ...), got an odd count of ", pairs.size(), " values");
    for (size_t i = 0; i < pairs.size(); ++i) {
      TORCH_CHECK_VALUE(pairs[i] >= 0 && pairs[i] < a.V, op, ": limbs[", i / 2, "] = (", pairs[i - i % 2], ", ",
                        pairs[i - i % 2 + 1], ") names a joint outside [0, V) for V = ", a.V);
      a.limbs.push_back(static_cast<int32_t>(pairs[i]));
    }
  }
  a.L = static_cast<int64_t>(a.limbs.size() / 2);
  a.with_joints = with_joints;
  TORCH_CHECK_VALUE(with_joints || a.L > 0, op, ": nothing to render: with_joints is False and limbs is empty");
  a.C = (with_joints ? a.V : 0) + a.L;
  a.out_dtype = dtype.value_or(at::kFloat);
  const auto dt = a.out_dtype;
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": dtype must be float32, float64, float16 or bfloat16, got ", dt);
  return a;
}

template <typename index_t>
RenderGeometry<index_t> render_geometry(const RenderArgs& a, double sigma, double eps) {
  RenderGeometry<index_t> g{};
  g.N = static_cast<index_t>(a.N);
  g.M = static_cast<index_t>(a.M);
  g.T = static_cast<index_t>(a.T);
  g.V = static_cast<index_t>(a.V);
  g.C = static_cast<index_t>(a.C);
  g.H = static_cast<index_t>(a.H);
  g.W = static_cast<index_t>(a.W);
  g.joint_channels = a.with_joints ? g.V : index_t(0);
  g.three_sigma = 3.0 * sigma;
  g.two_sigma2 = 2.0f * static_cast<float>(sigma * sigma);
  // Compared with the float32 score in double, as NumPy 1.x compares a float32 scalar with a Python float.
  g.eps = eps;
  return g;
}

// The kernels read float32 keypoints and scores (computing in float32 whatever the input dtype, as the original
// computes on float32 arrays): converted and made contiguous here, which costs little next to the output.
inline at::Tensor render_input(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Test hook, CPU only: runs the CUDA kernel's per-thread body for the thread indices (runs of pixels, see
// render_threads) in `thread_order`, in that order, and returns the output.
at::Tensor render_heatmaps_run_thread_bodies(const at::Tensor& keypoints, const std::optional<at::Tensor>& scores,
                                             c10::IntArrayRef size, double sigma,
                                             std::optional<std::vector<int64_t>> limbs, bool with_joints, double eps,
                                             std::optional<at::ScalarType> dtype, const at::Tensor& thread_order);

}  // namespace epamx
