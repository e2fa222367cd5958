// Temporal shift, CUDA kernels: thin __global__ launchers around the per-thread bodies of temporal_shift_math.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "temporal_shift/temporal_shift.h"

namespace epamx {
namespace {

template <typename bits_t, typename index_t>
__global__ void shift_copy_kernel(ShiftGeometry<index_t> g, int sign, const bits_t* __restrict__ in,
                                  bits_t* __restrict__ out, index_t units) {
  EPAMX_GRID_STRIDE_LOOP(index_t, i, units) { shift_copy_thread(i, g, sign, in, out); }
}

template <typename bits_t, typename index_t>
__global__ void shift_inplace_kernel(ShiftGeometry<index_t> g, int sign, bits_t* x, index_t threads) {
  EPAMX_GRID_STRIDE_LOOP(index_t, j, threads) { shift_inplace_thread(j, g, sign, x); }
}

// Both launchers move data in the widest unit (up to 16 bytes) the shapes allow, so a thread's index
// arithmetic is paid once per 16 bytes rather than once per element wherever frame planes allow.
template <typename index_t>
void launch_copy(const at::Tensor& in, at::Tensor& out, const ShiftLayout& L, int sign, const char* op) {
  const int64_t unit = shift_copy_unit(in, L, &out);
  const auto g = shift_geometry<index_t>(in, L, unit);
  const auto units = static_cast<index_t>(out.numel() * out.element_size() / unit);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_by_unit(unit, op, [&]<typename bits_t>() {
    shift_copy_kernel<bits_t, index_t><<<cuda::blocks_for(units), cuda::kThreadsPerBlock, 0, stream>>>(
        g, sign, static_cast<const bits_t*>(in.const_data_ptr()), static_cast<bits_t*>(out.mutable_data_ptr()),
        units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename index_t>
void launch_inplace(const at::Tensor& x, const ShiftLayout& L, int sign, const char* op) {
  // Dense frame planes move in wide units; pixels with one other stride (channels-last) element by element.
  const bool dense = shift_planes_dense(x, L);
  const int64_t unit = dense ? shift_copy_unit(x, L) : x.element_size();
  const auto g = dense ? shift_geometry<index_t>(x, L, unit) : shift_geometry_strided<index_t>(x, L);
  const index_t threads = shift_inplace_threads(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_by_unit(unit, op, [&]<typename bits_t>() {
    shift_inplace_kernel<bits_t, index_t><<<cuda::blocks_for(threads), cuda::kThreadsPerBlock, 0, stream>>>(
        g, sign, static_cast<bits_t*>(x.mutable_data_ptr()), threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor shift_copy_cuda(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments, int sign,
                           const char* op) {
  const ShiftLayout L = check_shift_args(x, fold_div, num_segments, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor in = shift_planes_dense(x, L) ? x : x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return keep_memory_format(out, x);
  if (fits_int32(in)) {
    launch_copy<int32_t>(in, out, L, sign, op);
  } else {
    launch_copy<int64_t>(in, out, L, sign, op);
  }
  return keep_memory_format(out, x);
}

at::Tensor temporal_shift_cuda(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments) {
  return shift_copy_cuda(x, fold_div, num_segments, +1, "temporal_shift");
}

at::Tensor temporal_shift_backward_cuda(const at::Tensor& grad, int64_t fold_div,
                                        std::optional<int64_t> num_segments) {
  return shift_copy_cuda(grad, fold_div, num_segments, -1, "_temporal_shift_backward");
}

void shift_inplace_entry_cuda(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments, int sign,
                              const char* op) {
  const ShiftLayout L = check_shift_args(x, fold_div, num_segments, op);
  check_no_internal_overlap(x, op, "input");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  // Pixels with two strides: shift a dense copy, then write it back into the caller's tensor.
  const at::Tensor work = shift_planes_dense(x, L) || shift_pixels_uniform(x, L) ? x : x.contiguous();
  if (fits_int32(work)) {
    launch_inplace<int32_t>(work, L, sign, op);
  } else {
    launch_inplace<int64_t>(work, L, sign, op);
  }
  if (!work.is_same(x)) x.copy_(work);
}

void temporal_shift_inplace_cuda(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments) {
  shift_inplace_entry_cuda(x, fold_div, num_segments, +1, "temporal_shift_");
}

void temporal_shift_backward_inplace_cuda(const at::Tensor& grad, int64_t fold_div,
                                          std::optional<int64_t> num_segments) {
  shift_inplace_entry_cuda(grad, fold_div, num_segments, -1, "_temporal_shift_backward_");
}

}  // namespace

TORCH_LIBRARY_IMPL(epamx, CUDA, m) {
  m.impl("temporal_shift", &temporal_shift_cuda);
  m.impl("_temporal_shift_backward", &temporal_shift_backward_cuda);
  m.impl("temporal_shift_", &temporal_shift_inplace_cuda);
  m.impl("_temporal_shift_backward_", &temporal_shift_backward_inplace_cuda);
}

}  // namespace epamx
