// Temporal shift, CPU kernels: at::parallel_for over frame planes (out of place; frames of pixel rows in
// channels-last memory) or shifted channels (in place).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_memory.h"
#include "common/cpu_parallel.h"
#include "temporal_shift/temporal_shift.h"
#include "temporal_shift/temporal_shift_cpu_kernel.h"

namespace epamx {
namespace {

// x dense in channels-last memory: [N, T, P, C], each pixel's channels one row. Output row (n, t, p) takes each
// channel group (the two shifted ones, the rest) from the frame shift_source_frame names, same pixel, so every
// frame is assembled from three frames read in memory order, in the same memory format.
at::Tensor shift_copy_channels_last_cpu(const at::Tensor& x, const ShiftLayout& L, int sign, at::MemoryFormat format,
                                        const char* op) {
  at::Tensor out = empty_for_overwrite(x.sizes(), x.options().memory_format(format));
  const int64_t frame = L.P * L.C;
  dispatch_by_unit(x.element_size(), op, [&]<typename bits_t>() {
    if constexpr (sizeof(bits_t) > 8) {
      TORCH_CHECK(false, op, ": unsupported element size ", sizeof(bits_t));
    } else {
      const auto* src = static_cast<const bits_t*>(x.const_data_ptr());
      auto* dst = static_cast<bits_t*>(out.mutable_data_ptr());
      at::parallel_for(0, L.N * L.T, grain_for(frame), [&](int64_t begin, int64_t end) {
        EPAMX_CPU_KERNEL_CALL(shift_frames_channels_last<bits_t>, src, dst, L.T, L.P, L.C, L.fold, sign, begin, end);
      });
    }
  });
  return out;
}

at::Tensor shift_copy_cpu(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments, int sign,
                          const char* op) {
  const ShiftLayout L = check_shift_args(x, fold_div, num_segments, op);
  const at::MemoryFormat format = x.suggest_memory_format();
  if (format != at::MemoryFormat::Contiguous && !x.is_contiguous() && x.is_contiguous(format) && x.numel() > 0) {
    return shift_copy_channels_last_cpu(x, L, sign, format, op);
  }
  // Strides of n, t and c are read as they are; only frame planes that are not dense are copied first.
  const at::Tensor in = shift_planes_dense(x, L) ? x : x.contiguous();
  at::Tensor out = empty_for_overwrite(x.sizes(), x.options());
  if (x.numel() == 0) return keep_memory_format(out, x);
  const int64_t unit = shift_copy_unit(in, L, &out);
  const auto g = shift_geometry<int64_t>(in, L, unit);
  dispatch_by_unit(unit, op, [&]<typename bits_t>() {
    const auto* src = static_cast<const bits_t*>(in.const_data_ptr());
    auto* dst = static_cast<bits_t*>(out.mutable_data_ptr());
    at::parallel_for(0, L.N * L.T * L.C, grain_for(L.P), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) shift_plane_run<bits_t, int64_t>(q, 0, g.P, g, sign, src, dst);
    });
  });
  return keep_memory_format(out, x);
}

at::Tensor temporal_shift_cpu(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments) {
  return shift_copy_cpu(x, fold_div, num_segments, +1, "temporal_shift");
}

at::Tensor temporal_shift_backward_cpu(const at::Tensor& grad, int64_t fold_div, std::optional<int64_t> num_segments) {
  return shift_copy_cpu(grad, fold_div, num_segments, -1, "_temporal_shift_backward");
}

void shift_inplace_cpu(const at::Tensor& x, const ShiftLayout& L, int sign, const char* op) {
  const int64_t unit = shift_copy_unit(x, L);
  const auto g = shift_geometry<int64_t>(x, L, unit);
  dispatch_by_unit(unit, op, [&]<typename bits_t>() {
    auto* data = static_cast<bits_t*>(x.mutable_data_ptr());
    at::parallel_for(0, L.N * 2 * L.fold, grain_for(L.T * L.P), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        shift_columns_inplace<bits_t, int64_t>(q / (2 * g.fold), q % (2 * g.fold), 0, g.P, g, sign, data);
      }
    });
  });
}

// Pixels with one stride but not dense (channels-last): column by column, channels innermost when they are
// contiguous, so one task's columns share cache lines.
void shift_inplace_strided_cpu(const at::Tensor& x, const ShiftLayout& L, int sign, const char* op) {
  const auto g = shift_geometry_strided<int64_t>(x, L);
  dispatch_by_unit(x.element_size(), op, [&]<typename bits_t>() {
    auto* data = static_cast<bits_t*>(x.mutable_data_ptr());
    at::parallel_for(0, shift_inplace_threads(g), grain_for(L.T), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) shift_inplace_thread<bits_t, int64_t>(j, g, sign, data);
    });
  });
}

void shift_inplace_entry_cpu(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments, int sign,
                             const char* op) {
  const ShiftLayout L = check_shift_args(x, fold_div, num_segments, op);
  check_no_internal_overlap(x, op, "input");
  if (x.numel() == 0) return;
  if (shift_planes_dense(x, L)) {
    shift_inplace_cpu(x, L, sign, op);
  } else if (shift_pixels_uniform(x, L)) {
    shift_inplace_strided_cpu(x, L, sign, op);
  } else {
    // Pixels with two strides: shift a dense copy, then write it back into the caller's tensor.
    const at::Tensor work = x.contiguous();
    shift_inplace_cpu(work, L, sign, op);
    x.copy_(work);
  }
}

void temporal_shift_inplace_cpu(const at::Tensor& x, int64_t fold_div, std::optional<int64_t> num_segments) {
  shift_inplace_entry_cpu(x, fold_div, num_segments, +1, "temporal_shift_");
}

void temporal_shift_backward_inplace_cpu(const at::Tensor& grad, int64_t fold_div,
                                         std::optional<int64_t> num_segments) {
  shift_inplace_entry_cpu(grad, fold_div, num_segments, -1, "_temporal_shift_backward_");
}

}  // namespace

at::Tensor temporal_shift_run_thread_bodies(at::Tensor input, int64_t fold_div, std::optional<int64_t> num_segments,
                                            bool inplace, bool backward, const at::Tensor& thread_order) {
  constexpr const char* op = "temporal_shift_run_thread_bodies";
  check_device_type(input, c10::DeviceType::CPU, op, "input");
  check_same_device(input, "input", thread_order, "thread_order", op);
  TORCH_CHECK_TYPE(thread_order.scalar_type() == at::kLong && thread_order.dim() == 1, op,
                   ": thread_order must be a 1-D int64 tensor");
  const ShiftLayout L = check_shift_args(input, fold_div, num_segments, op);
  const int sign = backward ? -1 : +1;
  // In place, pixels with one stride are walked where they are, as temporal_shift_ does; otherwise densely.
  const bool strided = inplace && !shift_planes_dense(input, L) && shift_pixels_uniform(input, L);
  at::Tensor src = strided ? input : input.contiguous();
  at::Tensor out = inplace ? src : at::empty(input.sizes(), input.options());
  const int64_t unit = strided ? input.element_size() : inplace ? shift_copy_unit(src, L) : shift_copy_unit(src, L, &out);
  const auto g = strided ? shift_geometry_strided<int64_t>(src, L) : shift_geometry<int64_t>(src, L, unit);
  const int64_t threads = inplace ? shift_inplace_threads(g) : input.numel() * input.element_size() / unit;
  TORCH_CHECK_VALUE(thread_order.numel() == threads, op, ": thread_order must list all ", threads,
                    " thread indices, got ", thread_order.numel());
  const at::Tensor order = thread_order.contiguous();
  const int64_t* idx = order.const_data_ptr<int64_t>();
  dispatch_by_unit(unit, op, [&]<typename bits_t>() {
    auto* dst = static_cast<bits_t*>(out.mutable_data_ptr());
    const auto* in = static_cast<const bits_t*>(src.const_data_ptr());
    for (int64_t k = 0; k < threads; ++k) {
      TORCH_CHECK_VALUE(idx[k] >= 0 && idx[k] < threads, op, ": thread index ", idx[k], " out of range");
      if (inplace) {
        shift_inplace_thread<bits_t, int64_t>(idx[k], g, sign, dst);
      } else {
        shift_copy_thread<bits_t, int64_t>(idx[k], g, sign, in, dst);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(epamx, CPU, m) {
  m.impl("temporal_shift", &temporal_shift_cpu);
  m.impl("_temporal_shift_backward", &temporal_shift_backward_cpu);
  m.impl("temporal_shift_", &temporal_shift_inplace_cpu);
  m.impl("_temporal_shift_backward_", &temporal_shift_backward_inplace_cpu);
}

}  // namespace epamx
