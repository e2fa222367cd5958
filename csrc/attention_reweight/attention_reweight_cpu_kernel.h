#pragma once
// Attention reweighting, the vectorised CPU kernels' interface (built once per instruction set: common/cpu_isa.h).
#include <cstdint>

#include "common/cpu_isa.h"

namespace epamx {

// x, and out or grad and dx, are dense (N, C, T, H, W) tensors: in NCTHW order, or in NTHWC order when
// channels_last. S (N, T, P) and A (N, T) are dense; P = H*W. dS and dA are written dense like S and A.
template <typename scalar_t>
struct ReweightCpuArgs {
  const scalar_t* x;
  const scalar_t* s;
  const scalar_t* a;
  const scalar_t* grad;  // backward only
  scalar_t* out;         // the forward's output, or dx
  scalar_t* ds;          // backward only
  scalar_t* da;          // backward only
  int64_t N, C, T, P;
  bool channels_last;
};

EPAMX_DECLARE_CPU_KERNELS(
    template <typename scalar_t> void attention_reweight_forward_kernel(const ReweightCpuArgs<scalar_t>& args);
    template <typename scalar_t> void attention_reweight_backward_kernel(const ReweightCpuArgs<scalar_t>& args);)

}  // namespace epamx
