#include "common/cpu_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace epamx {
namespace {

class CachingCpuAllocator final : public c10::Allocator {
 public:
  // Outside a scope, and below kCacheMinBytes, the default allocator serves the request (with its profiler
  // reporting); inside one, large requests come from the cache.
  c10::DataPtr allocate(size_t n) override {
    if (n < kCacheMinBytes || depth_.load(std::memory_order_acquire) == 0) {
      return c10::GetDefaultCPUAllocator()->allocate(n);
    }
    size_t size = cpu_cache_size_class(n);
    std::vector<void*> evicted;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      data = take(size, evicted);
      if (data != nullptr) live_[data] = size;
    }
    for (void* p : evicted) c10::free_cpu(p);
    // No huge-page advice on fresh buffers (unlike empty_for_overwrite): where the kernel compacts memory on a
    // huge-page fault, the first forward pass ran 5x slower with it, and later passes reuse the buffers anyway.
    if (data == nullptr) {
      void* fresh = nullptr;
      try {
        fresh = c10::alloc_cpu(size);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        in_use_bytes_ -= size;
        throw;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      live_[fresh] = size;
      data = fresh;
    }
    return {data, data, &CachingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  // oneDNN allocates raw buffers through the current allocator and frees them through whichever is current
  // then; this one stays current once installed, so every buffer it handed out comes back through release().
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCpuAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!installed_) {
      // Only over PyTorch's default allocator, whose buffers (c10::alloc_cpu) this one frees for it. Once
      // installed it stays, passing requests through to the default allocator outside scopes; the highest
      // priority keeps an allocator registered with a default priority from displacing it.
      if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) {
        TORCH_WARN_ONCE("epamx cpu_cache: another CPU allocator is installed; the cache stays off");
        depth_.fetch_add(1, std::memory_order_acq_rel);
        return;
      }
      c10::SetCPUAllocator(this, kPriority);
      installed_ = true;
    }
    if (depth_.fetch_add(1, std::memory_order_acq_rel) == 0) ++scopes_;
  }

  // The last scope out also releases the free buffers that neither it nor the scope before it used: after a
  // change of input shapes, the old shapes' buffers go back once two forward passes have not needed them.
  void exit() {
    std::vector<void*> stale;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(depth_.load(std::memory_order_acquire) > 0, "epamx cpu_cache: exit without a matching enter");
      if (depth_.fetch_sub(1, std::memory_order_acq_rel) > 1) return;
      for (auto it = free_.begin(); it != free_.end();) {
        if (it->second.scope + 1 < scopes_) {
          stale.push_back(it->second.data);
          free_bytes_ -= it->first;
          ++evictions_;
          it = free_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (void* p : stale) c10::free_cpu(p);
  }

  void empty() {
    std::vector<void*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) released.push_back(entry.second.data);
      free_.clear();
      free_bytes_ = 0;
    }
    for (void* p : released) c10::free_cpu(p);
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t depth = depth_.load(std::memory_order_acquire);
    return {installed_ && depth > 0, depth, in_use_bytes_, free_bytes_, peak_in_use_bytes_, hits_, misses_, evictions_};
  }

  static CachingCpuAllocator& instance() {
    // Never destroyed: tensors freed during interpreter shutdown still call release().
    static auto* allocator = new CachingCpuAllocator();
    return *allocator;
  }

 private:
  static constexpr uint8_t kPriority = 255;
  static constexpr size_t kReserveFactor = 4;

  // Under the lock: the smallest free buffer that fits `size` without wasting more than a quarter of it (the
  // last freed of its size), or nullptr after choosing free buffers to release (into `evicted`, largest first) so
  // that the buffers reserved (in use + free) stay within kReserveFactor times the most ever in use at once. Sets
  // `size` to the buffer's own size.
  void* take(size_t& size, std::vector<void*>& evicted) {
    void* data = nullptr;
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first - size <= size / 4) {
      // Of the buffers of that size, the one freed last: the likeliest to be still in the CPU's caches.
      it = std::prev(free_.upper_bound(it->first));
      size = it->first;
      data = it->second.data;
      free_.erase(it);
      free_bytes_ -= size;
      ++hits_;
    } else {
      ++misses_;
      const size_t limit = kReserveFactor * std::max(peak_in_use_bytes_, in_use_bytes_ + size);
      while (!free_.empty() && in_use_bytes_ + free_bytes_ + size > limit) {
        auto largest = std::prev(free_.end());
        evicted.push_back(largest->second.data);
        free_bytes_ -= largest->first;
        free_.erase(largest);
        ++evictions_;
      }
    }
    in_use_bytes_ += size;
    peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
    return data;
  }

  // The cached buffers' deleter, and the raw deleter: a pointer it did not hand out is the default allocator's,
  // freed by that allocator's raw deleter.
  static void release(void* data) {
    auto& self = instance();
    std::unique_lock<std::mutex> lock(self.mutex_);
    auto it = self.live_.find(data);
    if (it == self.live_.end()) {
      lock.unlock();
      c10::GetDefaultCPUAllocator()->raw_deleter()(data);
      return;
    }
    const size_t size = it->second;
    self.live_.erase(it);
    self.in_use_bytes_ -= size;
    self.free_.emplace(size, FreeBuffer{data, self.scopes_});
    self.free_bytes_ += size;
  }

  std::mutex mutex_;
  bool installed_ = false;
  std::atomic<int64_t> depth_{0};
  struct FreeBuffer {
    void* data;
    uint64_t scope;  // the outermost scope it was last freed in
  };
  std::multimap<size_t, FreeBuffer> free_;
  uint64_t scopes_ = 0;  // outermost scopes opened so far
  std::unordered_map<void*, size_t> live_;
  size_t in_use_bytes_ = 0;
  size_t free_bytes_ = 0;
  size_t peak_in_use_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  int64_t evictions_ = 0;
};

}  // namespace

size_t cpu_cache_size_class(size_t n) {
  size_t power = 1;  // the largest power of two <= n
  while (power <= n / 2) power <<= 1;
  const size_t step = power / 16;
  return (n + step - 1) / step * step;
}

void cpu_cache_enter() { CachingCpuAllocator::instance().enter(); }
void cpu_cache_exit() { CachingCpuAllocator::instance().exit(); }
void cpu_cache_empty() { CachingCpuAllocator::instance().empty(); }
CpuCacheStats cpu_cache_stats() { return CachingCpuAllocator::instance().stats(); }

}  // namespace epamx
