#pragma once
// The CUDA emulator's forced include (-include prelude.h): what a .cu file of csrc/ needs from nvcc and the CUDA
// runtime, as plain C++ that runs every CUDA thread of a launch on the CPU (runtime.cpp). emulator.py compiles each
// .cu file as C++ with this first, after rewriting its launches `k<<<grid, block, smem, stream>>>(args)` into
// `::epamx_emu::launch(k, {grid, block, smem, stream}, "file:line")(args)`.
//
// What holds as on a GPU: every thread of a block runs the kernel with its own threadIdx; __syncthreads() waits for
// every thread of the block; a warp shuffle exchanges the values of the 32 lanes of a warp, each lane getting the
// source lane's value as of the shuffle; __shared__ variables are one copy per block (blocks run one after another).
// What the emulator adds: a __syncthreads() or a full-warp shuffle that not every thread it names reaches (a hang or
// undefined behaviour on a GPU) stops the launch with an error naming the kernel, the block and where each thread
// is; the schedule (EPAMX_CUDA_EMU_SCHEDULE, runtime.cpp) sets the order threads, warps and blocks run in, and
// whether warps keep pace or one runs ahead to the next __syncthreads(), so results that depend on that order
// (races) differ between schedules.
// What it does not model: concurrency itself (threads run one at a time, between barriers to completion), memory
// visibility, device-only code paths
// (__CUDA_ARCH__ is not defined: the host branch of an #ifdef runs), the speed of anything.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One copy per block: a block's threads share it, and blocks run one after another.
#define __shared__ static

namespace epamx_emu {

// What the running thread sees as threadIdx, blockIdx, blockDim and gridDim (set by the scheduler on every switch).
struct ThreadContext {
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
};
const ThreadContext& context();

struct Config {
  dim3 grid, block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shared_bytes(s), stream(st) {}
};

// Runs body once for every thread of every block of c's grid; throws std::runtime_error on a barrier no thread
// group can pass, a failed CUDA_KERNEL_ASSERT, or a launch a GPU would refuse.
void run_grid(const Config& c, const char* site, const std::function<void()>& body);

// The argument as a kernel parameter of type T takes it: by implicit conversion only, as in a launch.
template <typename T>
T as_parameter(T value) {
  return value;
}

template <typename... P>
auto launch(void (*kernel)(P...), Config c, const char* site) {
  return [kernel, c, site](auto&&... args) {
    const std::tuple<std::decay_t<P>...> values(as_parameter<std::decay_t<P>>(args)...);
    run_grid(c, site, [&] { std::apply(kernel, values); });
  };
}

// Waits at the running thread's block barrier.
void sync_threads();
// A warp shuffle: every lane of the running thread's warp stores `bytes` of its value, then reads source lane
// `src_lane`'s (its own where src_lane is out of the warp). kind names the intrinsic, so that lanes at different
// shuffles are reported.
void shuffle(unsigned int mask, const void* value, size_t bytes, int src_lane, void* result, const char* kind);
int lane_id();
[[noreturn]] void kernel_assert_failed(const char* condition, const char* file, int line);
// Fills bytes at p with 0xFF (NaN as a float) the first time a thread of the running block calls it for p
// (emulator.py puts a call after every __shared__ declaration): a block cannot read another block's values.
void poison_shared(void* p, size_t bytes);
// Records that kernel `name` ran, as name/int32 or name/int64 where its signature (__PRETTY_FUNCTION__) has an
// index_t (tools/cuda_emu/emulator.py puts a call at the top of every __global__ body).
bool mark_kernel(const char* name, const char* signature);
// EPAMX_CUDA_EMU_INDEX: "int32" (or unset) lets the kernels use int32 offsets where the tensors fit them; "int64"
// makes every choice of offsets int64 (emulator.py rewrites the choices to ask narrow_index()).
bool narrow_index();
// Nothing, where narrow_index(); else a tensor too large for int32 offsets (an expanded view of one element), which
// makes dispatch_index_type choose int64.
const at::Tensor* index_probe();

}  // namespace epamx_emu

#define threadIdx (::epamx_emu::context().thread_idx)
#define blockIdx (::epamx_emu::context().block_idx)
#define blockDim (::epamx_emu::context().block_dim)
#define gridDim (::epamx_emu::context().grid_dim)

inline void __syncthreads() { ::epamx_emu::sync_threads(); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T>, "a shuffled value is copied as bytes");
  if (width != 32)
    ::epamx_emu::kernel_assert_failed("__shfl_xor_sync width == 32 (the emulator's only width)", __FILE__, __LINE__);
  T result;
  ::epamx_emu::shuffle(mask, &value, sizeof(T), ::epamx_emu::lane_id() ^ lane_mask, &result, "__shfl_xor_sync");
  return result;
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T>, "a shuffled value is copied as bytes");
  if (width != 32)
    ::epamx_emu::kernel_assert_failed("__shfl_down_sync width == 32 (the emulator's only width)", __FILE__, __LINE__);
  T result;
  ::epamx_emu::shuffle(mask, &value, sizeof(T), ::epamx_emu::lane_id() + static_cast<int>(delta), &result,
                       "__shfl_down_sync");
  return result;
}

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? static_cast<void>(0) : ::epamx_emu::kernel_assert_failed(#cond, __FILE__, __LINE__))

// The kernels register as the CPU kernels of the epamx_emu operators, which emulator.py defines with epamx's schemas.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(epamx_emu, CPU, m, C10_UID)
