// The epamx operator library: every schema, declared once, and the pybind11 module epamx._C.
// Device kernels register themselves in <op>/<op>_cpu.cpp and <op>/<op>_cuda.cu.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "attention_reweight/attention_reweight.h"
#include "batch_norm_act/batch_norm_act.h"
#include "channel_pool/channel_pool.h"
#include "common/cpu_cache.h"
#include "common/cpu_isa.h"
#include "render_heatmaps/render_heatmaps.h"
#include "temporal_shift/temporal_shift.h"

#if EPAMX_WITH_CUDA
namespace epamx {
int cuda_runtime_version();  // common/cuda_info.cu
}
#endif

TORCH_LIBRARY(epamx, m) {
  // Temporal shift (TSM). input: (N, C, T, H, W), or (N*T, C, H, W) with num_segments = T.
  m.def("temporal_shift(Tensor input, int fold_div=8, int? num_segments=None) -> Tensor");
  m.def("temporal_shift_(Tensor(a!) input, int fold_div=8, int? num_segments=None) -> ()");
  m.def("_temporal_shift_backward(Tensor grad, int fold_div, int? num_segments) -> Tensor");
  // The opposite shift, in place: undoes temporal_shift_ except for the frames the shift dropped.
  m.def("_temporal_shift_backward_(Tensor(a!) grad, int fold_div, int? num_segments) -> ()");

  // Spatial-temporal attention. x: (N, C, T, H, W); spatial: (N, 1, T, H, W); temporal: (N, 1, T, 1, 1).
  m.def("attention_reweight(Tensor x, Tensor spatial, Tensor temporal) -> Tensor");
  m.def("_attention_reweight_backward(Tensor grad, Tensor x, Tensor spatial, Tensor temporal) -> (Tensor, Tensor, Tensor)");
  // Max and mean over channels of frames 0, t_stride, 2 t_stride, ...: (N, C, T, H, W) -> (N, 2, T', H, W).
  m.def("channel_pool(Tensor x, int t_stride=1) -> Tensor");
  m.def("_channel_pool_backward(Tensor grad, Tensor x, int t_stride) -> Tensor");

  // Batch norm + activation, split at its per-(n, c) reductions. x: (N, C, ...); scale, shift and the coef_*:
  // (N, C) in x's accumulation dtype; activation 0 identity, 1 ReLU, 2 SiLU; reductions (N, C) float64.
  m.def("_channel_moments(Tensor x) -> (Tensor, Tensor)");
  m.def("affine_act(Tensor x, Tensor scale, Tensor shift, int activation) -> Tensor");
  m.def("_affine_act_backward_reduce(Tensor grad, Tensor x, Tensor scale, Tensor shift, int activation) -> (Tensor, Tensor)");
  m.def("_affine_act_backward(Tensor grad, Tensor x, Tensor scale, Tensor shift, Tensor coef_u, Tensor coef_x, "
        "Tensor coef_1, int activation) -> Tensor");

  // Squeeze-and-excitation in inference, CPU only. x: (N, C, ...); channel_sums: (N, C) in x's accumulation dtype;
  // gate_silu_: x = silu(x * gate[n, c]) in place, gate (N, C) in x's accumulation dtype; no gate: x = silu(x).
  m.def("channel_sums(Tensor x) -> Tensor");
  m.def("gate_silu_(Tensor(a!) x, Tensor? gate) -> ()");

  // A 4-D/5-D tensor in channels-last memory (optionally cast to dtype) in one pass, CPU only: the models' inputs.
  m.def("to_channels_last(Tensor x, ScalarType? dtype=None) -> Tensor");

  // Pose heatmaps (PoseC3D GeneratePoseTarget). keypoints: (N, M, T, V, 2), scores: (N, M, T, V),
  // limbs: joint pairs flattened; output (N, C, T, H, W), C = V (with_joints) + L.
  m.def("render_heatmaps(Tensor keypoints, Tensor? scores, int[2] size, float sigma=0.6, int[]? limbs=None, "
        "bool with_joints=True, float eps=1e-4, ScalarType? dtype=None) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "epamx native extension: registers the torch.ops.epamx operators and reports how it was built";
  m.def("build_info", [] {
    pybind11::dict info;
    info["version"] = EPAMX_VERSION;
    info["torch_version"] = TORCH_VERSION;
    info["cxx_compiler"] = EPAMX_CXX_COMPILER;
#ifdef _OPENMP
    info["openmp"] = _OPENMP;
#else
    info["openmp"] = pybind11::none();
#endif
    info["cpu_isa"] = epamx::cpu_isa_name();  // the instruction set of the vectorised CPU kernels in use
    info["cuda"] = static_cast<bool>(EPAMX_WITH_CUDA);
    info["cuda_archs"] = std::string(EPAMX_CUDA_ARCHS);
#if EPAMX_WITH_CUDA
    info["cuda_runtime_version"] = epamx::cuda_runtime_version();
#else
    info["cuda_runtime_version"] = pybind11::none();
#endif
    return info;
  });
  // The caching CPU allocator behind epamx.memory.cpu_cache (see common/cpu_cache.h).
  m.def("_cpu_cache_enter", &epamx::cpu_cache_enter);
  m.def("_cpu_cache_exit", &epamx::cpu_cache_exit);
  m.def("_cpu_cache_empty", &epamx::cpu_cache_empty);
  m.def("_cpu_cache_size_class", &epamx::cpu_cache_size_class, pybind11::arg("nbytes"));
  m.def("_cpu_cache_stats", [] {
    const epamx::CpuCacheStats s = epamx::cpu_cache_stats();
    pybind11::dict out;
    out["active"] = s.active;
    out["depth"] = s.depth;
    out["in_use_bytes"] = s.in_use_bytes;
    out["free_bytes"] = s.free_bytes;
    out["peak_in_use_bytes"] = s.peak_in_use_bytes;
    out["hits"] = s.hits;
    out["misses"] = s.misses;
    out["evictions"] = s.evictions;
    out["min_bytes"] = epamx::kCacheMinBytes;
    return out;
  });
  auto testing = m.def_submodule("_testing", "Hooks for epamx's own tests; not a public API");
  testing.def("temporal_shift_run_thread_bodies", &epamx::temporal_shift_run_thread_bodies, pybind11::arg("input"),
              pybind11::arg("fold_div"), pybind11::arg("num_segments"), pybind11::arg("inplace"),
              pybind11::arg("backward"), pybind11::arg("thread_order"));
  testing.def("attention_reweight_backward_run_thread_bodies", &epamx::attention_reweight_backward_run_thread_bodies,
              pybind11::arg("grad"), pybind11::arg("x"), pybind11::arg("spatial"), pybind11::arg("temporal"),
              pybind11::arg("groups"), pybind11::arg("order1"), pybind11::arg("order2"));
  testing.def("batch_norm_act_run_thread_bodies", &epamx::batch_norm_act_run_thread_bodies, pybind11::arg("kind"),
              pybind11::arg("x"), pybind11::arg("grad"), pybind11::arg("scale"), pybind11::arg("shift"),
              pybind11::arg("coef_u"), pybind11::arg("coef_x"), pybind11::arg("coef_1"), pybind11::arg("activation"),
              pybind11::arg("order"));
  testing.def("batch_norm_act_reduce_plan", &epamx::batch_norm_act_reduce_plan, pybind11::arg("x"));
  testing.def("channel_pool_run_thread_bodies", &epamx::channel_pool_run_thread_bodies, pybind11::arg("x"),
              pybind11::arg("t_stride"), pybind11::arg("grad"), pybind11::arg("order"));
  testing.def("render_heatmaps_run_thread_bodies", &epamx::render_heatmaps_run_thread_bodies,
              pybind11::arg("keypoints"), pybind11::arg("scores"), pybind11::arg("size"), pybind11::arg("sigma"),
              pybind11::arg("limbs"), pybind11::arg("with_joints"), pybind11::arg("eps"), pybind11::arg("dtype"),
              pybind11::arg("thread_order"));
}
