// Kernels with known faults, for the CUDA emulator's own tests (tests/ops/test_cuda_emulated.py): for each fault the
// emulator claims to catch, a kernel that has it and a sound twin that must pass. Compiled only by the emulator.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>

namespace epamx_emu_selftest {

constexpr int kThreads = 64;

// A block's 64 values summed by a tree in shared memory into out[block]. Faults: with `barrier` false the
// __syncthreads() between the tree's levels is missing (a race, whose result depends on the order the threads run
// in); with `store_last` false the last thread never stores its value (the sum reads shared memory the block has
// not written).
__global__ void tree_sum_kernel(const float* x, float* out, bool barrier, bool store_last) {
  __shared__ float v[kThreads];
  const int t = threadIdx.x;
  if (store_last || t != kThreads - 1) v[t] = x[blockIdx.x * kThreads + t];
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (barrier) __syncthreads();
    if (t < half) v[t] += v[t + half];
  }
  if (t == 0) out[blockIdx.x] = v[0];
  if (barrier) __syncthreads();
}

// Every lane gets its warp's sum by a butterfly of shuffles; lane `exit_lane` (if 0..31) returns first, so its warp's
// full-mask shuffles lack a lane: a hang or undefined behaviour on a GPU. (Launched with 48 threads a block, the last
// warp's full mask names 16 lanes that do not exist.)
__global__ void warp_sum_kernel(const float* x, float* out, int exit_lane) {
  const int t = threadIdx.x;
  if (t % 32 == exit_lane) return;
  float v = x[blockIdx.x * kThreads + t];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[blockIdx.x * kThreads + t] = v;
}

// __syncthreads() in a branch only the first `threads` threads of the block take (all of them: sound).
__global__ void divergent_sync_kernel(float* out, int threads) {
  if (static_cast<int>(threadIdx.x) < threads) __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = 1.0f;
}

// Thread `bad` of block 1 fails a CUDA_KERNEL_ASSERT.
__global__ void assert_kernel(float* out, int bad) {
  CUDA_KERNEL_ASSERT(blockIdx.x != 1 || static_cast<int>(threadIdx.x) != bad);
  out[blockIdx.x * kThreads + threadIdx.x] = 1.0f;
}

// Thread i writes out[i] = x[i + offset]: with offset 1 the last thread reads one element past x's end, which only
// AddressSanitizer sees (EPAMX_CUDA_EMU_SANITIZE=address; compute-sanitizer's memcheck on a GPU).
__global__ void shifted_read_kernel(const float* x, float* out, int offset) {
  const int i = static_cast<int>(blockIdx.x * kThreads + threadIdx.x);
  out[i] = x[i + offset];
}

// Runs `kernel` on x (float32, contiguous, a multiple of 64 elements: a block of 64 threads each).
at::Tensor selftest(std::string_view kernel, const at::Tensor& x_in, int64_t arg) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.numel() > 0 && x_in.numel() % kThreads == 0,
              "_selftest: x must be float32 with a multiple of 64 elements");
  const at::Tensor x = x_in.contiguous();
  const auto blocks = static_cast<unsigned int>(x.numel() / kThreads);
  at::Tensor out = at::empty_like(x);
  const float* in = x.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  if (kernel == "tree_sum") {
    out = at::empty({x.numel() / kThreads}, x.options());
    o = out.mutable_data_ptr<float>();
    tree_sum_kernel<<<blocks, kThreads>>>(in, o, arg != 0, arg != 2);  // arg: 0 no barrier, 1 sound, 2 no store
  } else if (kernel == "warp_sum") {
    warp_sum_kernel<<<blocks, arg == 48 ? 48 : kThreads>>>(in, o, static_cast<int>(arg));  // arg 48: blocks of 48
  } else if (kernel == "divergent_sync") {
    divergent_sync_kernel<<<blocks, kThreads>>>(o, static_cast<int>(arg));
  } else if (kernel == "shifted_read") {
    shifted_read_kernel<<<blocks, kThreads>>>(in, o, static_cast<int>(arg));
  } else if (kernel == "assert") {
    assert_kernel<<<blocks, kThreads>>>(o, static_cast<int>(arg));
  } else {
    TORCH_CHECK(false, "_selftest: unknown kernel ", kernel);
  }
  return out;
}

}  // namespace epamx_emu_selftest

TORCH_LIBRARY_FRAGMENT(epamx_emu, m) {
  m.def("_selftest(str kernel, Tensor x, int arg) -> Tensor", &epamx_emu_selftest::selftest);
}
