// render_heatmaps, CUDA kernel: one thread per run of a few pixels of an output row (render_run_thread of
// render_heatmaps_math.h), so every element is written exactly once, neighbouring threads write neighbouring
// memory, and no two threads write the same address.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "render_heatmaps/render_heatmaps.h"

namespace epamx {
namespace {

template <typename out_t, typename index_t>
__global__ void render_heatmaps_kernel(RenderGeometry<index_t> g, const float* __restrict__ kp,
                                       const float* __restrict__ scores, const int32_t* __restrict__ limbs,
                                       out_t* __restrict__ out, index_t count) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, count) { render_run_thread(i, g, kp, scores, limbs, out); }
}

template <typename index_t>
void launch_render(const RenderArgs& a, double sigma, double eps, const at::Tensor& kp, const at::Tensor& sc,
                   const at::Tensor& limbs, at::Tensor& out) {
  const auto g = render_geometry<index_t>(a, sigma, eps);
  const index_t count = render_threads(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out_dtype, "render_heatmaps", [&] {
    render_heatmaps_kernel<scalar_t, index_t><<<cuda::blocks_for(count), cuda::kThreadsPerBlock, 0, stream>>>(
        g, kp.const_data_ptr<float>(), sc.defined() ? sc.const_data_ptr<float>() : nullptr,
        limbs.defined() ? limbs.const_data_ptr<int32_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor render_heatmaps_cuda(const at::Tensor& keypoints, const std::optional<at::Tensor>& scores,
                                c10::IntArrayRef size, double sigma, at::OptionalIntArrayRef limbs, bool with_joints,
                                double eps, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "render_heatmaps";
  const RenderArgs a = check_render_args(keypoints, scores, size, sigma, limbs, with_joints, dtype, op);
  const c10::cuda::CUDAGuard guard(keypoints.device());
  at::Tensor out = at::empty({a.N, a.C, a.T, a.H, a.W}, keypoints.options().dtype(a.out_dtype));
  if (out.numel() == 0) return out;
  const at::Tensor kp = render_input(keypoints);
  const at::Tensor sc = scores.has_value() ? render_input(*scores) : at::Tensor();
  // The limb table is a few hundred bytes: staged in pinned memory and copied on the current stream without
  // waiting for it (the caching host allocator keeps the staging buffer until the copy has run).
  at::Tensor limb_table;
  if (a.L > 0) {
    at::Tensor host = at::empty({2 * a.L}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    std::copy(a.limbs.begin(), a.limbs.end(), host.mutable_data_ptr<int32_t>());
    limb_table = host.to(keypoints.device(), /*non_blocking=*/true);
  }
  // int32 indices where every index, and the grid-stride loop's last step past the end, stays below 2^31.
  constexpr int64_t kInt32Limit = int64_t(1) << 30;
  if (out.numel() < kInt32Limit && kp.numel() < kInt32Limit) {
    launch_render<int32_t>(a, sigma, eps, kp, sc, limb_table, out);
  } else {
    launch_render<int64_t>(a, sigma, eps, kp, sc, limb_table, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) { m.impl("render_heatmaps", &render_heatmaps_cuda); }

}  // namespace epamx
