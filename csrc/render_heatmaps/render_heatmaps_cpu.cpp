// render_heatmaps, CPU kernel: at::parallel_for over output planes (n, c, t); each plane is zeroed once and every
// person's stamp is drawn into its own window only, so the work is the plane's writes plus the windows' pixels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_memory.h"
#include "common/cpu_parallel.h"
#include "render_heatmaps/render_heatmaps.h"

namespace epamx {
namespace {

// Max-accumulates one stamp into its window of `acc`, an H*W float32 plane. Each row's loop is branch-free
// (see stamp_value), so the compiler vectorises it.
template <bool segment>
void draw_stamp(const Stamp& s, float two_sigma2, int64_t width, float* acc) {
  for (int32_t y = s.y0; y < s.y1; ++y) {
    float* row = acc + y * width;
    for (int32_t x = s.x0; x < s.x1; ++x) {
      const float v = stamp_value<segment>(s, two_sigma2, x, y);
      row[x] = v > row[x] ? v : row[x];
    }
  }
}

// Draws every person's stamp of plane q (channel c of frame t of clip n) into `acc`, a zeroed H*W plane.
void draw_plane(int64_t q, const RenderGeometry<int64_t>& g, const float* kp, const float* scores,
                const int32_t* limbs, float* acc) {
  const int64_t t = q % g.T;
  const int64_t c = (q / g.T) % g.C;
  const int64_t n = q / (g.T * g.C);
  for (int64_t m = 0; m < g.M; ++m) {
    const Stamp s = channel_stamp(n, m, t, c, g, kp, scores, limbs);
    if (stamp_is_empty(s)) continue;
    if (s.segment) {
      draw_stamp<true>(s, g.two_sigma2, g.W, acc);
    } else {
      draw_stamp<false>(s, g.two_sigma2, g.W, acc);
    }
  }
}

template <typename out_t>
void render_cpu(const RenderGeometry<int64_t>& g, const float* kp, const float* scores, const int32_t* limbs,
                out_t* out) {
  const int64_t plane = g.H * g.W;
  at::parallel_for(0, g.N * g.C * g.T, grain_for(plane), [&](int64_t begin, int64_t end) {
    // float32 planes are drawn in the output itself; other dtypes through one float32 plane per task.
    std::vector<float> buffer(std::is_same_v<out_t, float> ? 0 : plane);
    for (int64_t q = begin; q < end; ++q) {
      float* acc;
      if constexpr (std::is_same_v<out_t, float>) {
        acc = out + q * plane;
      } else {
        acc = buffer.data();
      }
      std::fill(acc, acc + plane, 0.0f);
      draw_plane(q, g, kp, scores, limbs, acc);
      if constexpr (!std::is_same_v<out_t, float>) {
        out_t* dst = out + q * plane;
        for (int64_t p = 0; p < plane; ++p) dst[p] = static_cast<out_t>(acc[p]);
      }
    }
  });
}

at::Tensor render_heatmaps_cpu(const at::Tensor& keypoints, const std::optional<at::Tensor>& scores,
                               c10::IntArrayRef size, double sigma, at::OptionalIntArrayRef limbs, bool with_joints,
                               double eps, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "render_heatmaps";
  const RenderArgs a = check_render_args(keypoints, scores, size, sigma, limbs, with_joints, dtype, op);
  at::Tensor out = empty_for_overwrite({a.N, a.C, a.T, a.H, a.W}, keypoints.options().dtype(a.out_dtype));
  if (out.numel() == 0) return out;
  const at::Tensor kp = render_input(keypoints);
  const at::Tensor sc = scores.has_value() ? render_input(*scores) : at::Tensor();
  const auto g = render_geometry<int64_t>(a, sigma, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out_dtype, op, [&] {
    render_cpu<scalar_t>(g, kp.const_data_ptr<float>(), sc.defined() ? sc.const_data_ptr<float>() : nullptr,
                         a.limbs.data(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

at::Tensor render_heatmaps_run_thread_bodies(const at::Tensor& keypoints, const std::optional<at::Tensor>& scores,
                                             c10::IntArrayRef size, double sigma,
                                             std::optional<std::vector<int64_t>> limbs, bool with_joints, double eps,
                                             std::optional<at::ScalarType> dtype, const at::Tensor& thread_order) {
  constexpr const char* op = "render_heatmaps_run_thread_bodies";
  check_device_type(keypoints, c10::DeviceType::CPU, op, "keypoints");
  check_same_device(keypoints, "keypoints", thread_order, "thread_order", op);
  TORCH_CHECK_TYPE(thread_order.scalar_type() == at::kLong && thread_order.dim() == 1, op,
                   ": thread_order must be a 1-D int64 tensor");
  const at::OptionalIntArrayRef pairs = limbs.has_value() ? at::OptionalIntArrayRef(*limbs) : std::nullopt;
  const RenderArgs a = check_render_args(keypoints, scores, size, sigma, pairs, with_joints, dtype, op);
  at::Tensor out = at::empty({a.N, a.C, a.T, a.H, a.W}, keypoints.options().dtype(a.out_dtype));
  const auto g = render_geometry<int64_t>(a, sigma, eps);
  const int64_t threads = render_threads(g);
  TORCH_CHECK_VALUE(thread_order.numel() == threads, op, ": thread_order must list all ", threads,
                    " thread indices, got ", thread_order.numel());
  const at::Tensor kp = render_input(keypoints);
  const at::Tensor sc = scores.has_value() ? render_input(*scores) : at::Tensor();
  const at::Tensor order = thread_order.contiguous();
  const int64_t* idx = order.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out_dtype, op, [&] {
    auto* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < threads; ++k) {
      TORCH_CHECK_VALUE(idx[k] >= 0 && idx[k] < threads, op, ": thread index ", idx[k], " out of range");
      render_run_thread<scalar_t, int64_t>(idx[k], g, kp.const_data_ptr<float>(),
                                           sc.defined() ? sc.const_data_ptr<float>() : nullptr, a.limbs.data(), dst);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(epamx, CPU, m) { m.impl("render_heatmaps", &render_heatmaps_cpu); }

}  // namespace epamx
