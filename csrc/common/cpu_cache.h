#pragma once
// A caching allocator for large CPU buffers, active while at least one scope holds it (epamx.memory.cpu_cache).
//
// The first scope installs it as torch's CPU allocator and it stays installed (so that every buffer it handed
// out, including oneDNN's raw ones, is freed through it); outside scopes it passes requests to the default
// allocator. While active: a request of kCacheMinBytes or more is served by the smallest free
// cached buffer that fits it with at most a quarter to spare, and the buffer goes back to the free list when its
// tensor is freed, instead of to the C library (which returns such buffers to the kernel, so the next forward
// pass faults every page in again). Smaller requests get the default allocator's memory. The free buffers that
// neither the last nor the one before last outermost scope used are released when a scope closes, and a miss
// releases free buffers (largest first) while the reserve would exceed 4x the most ever in use at once.
// What it buys: docs/performance.md, Inference.
#include <cstddef>
#include <cstdint>

namespace epamx {

// glibc's initial mmap threshold: larger buffers are mapped for each request and unmapped when freed (the threshold
// rises only when such a buffer is freed, which the cache prevents), so every page of them would fault in again.
constexpr size_t kCacheMinBytes = size_t(128) << 10;

struct CpuCacheStats {
  bool active;
  int64_t depth;          // open scopes
  size_t in_use_bytes;    // cached-class buffers now held by tensors
  size_t free_bytes;      // buffers in the free lists
  size_t peak_in_use_bytes;
  int64_t hits;           // requests served from the free lists
  int64_t misses;         // requests that allocated fresh memory
  int64_t evictions;      // free buffers released: stale at a scope's end, or to bound the reserve on a miss
};

// Opens a scope: the first one ever installs the cache as torch's CPU allocator (only over the default one).
void cpu_cache_enter();
// Closes a scope (the last one open releases stale free buffers). Throws if none is open.
void cpu_cache_exit();
// Releases every free buffer to the C library; buffers held by tensors come back to the cache when freed.
void cpu_cache_empty();
CpuCacheStats cpu_cache_stats();
// The size a request of n bytes (n >= kCacheMinBytes) is rounded up to: a multiple of 1/16 of the largest power
// of two <= n, so within 1/16 of n.
size_t cpu_cache_size_class(size_t n);

}  // namespace epamx
