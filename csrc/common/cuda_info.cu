// Build facts only a CUDA translation unit knows.
#include <cuda_runtime_api.h>

namespace epamx {

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace epamx
