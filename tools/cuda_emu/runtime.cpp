// The CUDA emulator's scheduler (tools/cuda_emu/prelude.h): every CUDA thread of a block is a fiber (ucontext) on
// the calling CPU thread. A fiber runs until it returns or reaches a barrier: __syncthreads(), or a warp shuffle
// (every lane stores its value, waits for the others, then reads). The schedule (below) picks which fibers run and
// when a warp whose lanes all wait at a shuffle goes on; when none can, every thread waiting at __syncthreads() goes
// on if all of the block's threads do, else the launch stops with an error saying where each thread is. Blocks run
// one after another.
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace epamx_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;  // a GPU's limit on threads a block
constexpr size_t kSlotBytes = 16;

enum class State { Ready, AtSync, AtShuffle, Done };

struct Fiber {
  ucontext_t ctx;
  State state = State::Ready;
  const char* shuffle_kind = nullptr;  // at a shuffle: which one, and how many bytes
  size_t shuffle_bytes = 0;
  uint64_t shuffles = 0;  // shuffles done: their parity picks the bank of slots the next one uses
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int threads = 0;
  // Two banks of one slot a thread: a shuffle stores into bank (its count % 2), waits for its warp, then reads. A
  // lane cannot store into that bank again before every lane of its warp has read it: the shuffle in between waits
  // for them all.
  std::vector<std::array<unsigned char, kSlotBytes>> slots[2];
  const std::function<void()>* body = nullptr;
  std::string error;  // set by a fiber that failed; the scheduler throws it
  std::set<void*> poisoned;  // the __shared__ arrays filled with NaN in the running block
};

thread_local ThreadContext g_context;
thread_local Block* g_block = nullptr;
thread_local std::vector<void*> g_stacks;
std::set<std::string> g_kernels_run;

void* stack(int t) {
  while (static_cast<int>(g_stacks.size()) <= t) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map a fiber stack");
    g_stacks.push_back(p);
  }
  return g_stacks[t];
}

void fiber_main() {
  Block& b = *g_block;
  (*b.body)();
  b.fibers[b.current].state = State::Done;  // uc_link returns to the scheduler
}

// Stops the launch from inside the running thread: the scheduler throws `what`, naming the thread; the fiber never
// resumes.
[[noreturn]] void fail_thread(const std::string& what) {
  Block& b = *g_block;
  const uint3 t = g_context.thread_idx;
  b.error = "thread (" + std::to_string(t.x) + ", " + std::to_string(t.y) + ", " + std::to_string(t.z) + "): " + what;
  Fiber& f = b.fibers[b.current];
  f.state = State::Done;
  swapcontext(&f.ctx, &b.scheduler);
  std::abort();
}

// Hands control back to the scheduler until it resumes this fiber.
void park(State state) {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.current];
  f.state = state;
  swapcontext(&f.ctx, &b.scheduler);
}

uint3 unflatten(int t, const dim3& d) {
  const unsigned int u = static_cast<unsigned int>(t);
  return {u % d.x, u / d.x % d.y, u / (d.x * d.y)};
}

// The order fibers run in (EPAMX_CUDA_EMU_SCHEDULE):
//   lockstep[-reverse]  every thread of the block runs to its next barrier, in thread order (or reversed), then
//                       the warps whose lanes all wait at a shuffle go on, and so on: warps keep pace.
//   warps[-reverse]     one warp at a time (in order, or reversed) runs as far as it can, its shuffles passing at
//                       once, before the next: a warp gets ahead of the others up to the block's next
//                       __syncthreads(), as on a GPU where warps are scheduled independently.
//   shuffled:SEED       as warps, with warps, lanes and blocks in a random order drawn from SEED.
// Blocks run in thread order's sense: forward, reversed or shuffled.
struct Schedule {
  enum Order { Forward, Reverse, Shuffled } order = Forward;
  bool lockstep = true;
  uint64_t seed = 0;
};

Schedule schedule_from_env() {
  Schedule s;
  const char* v = std::getenv("EPAMX_CUDA_EMU_SCHEDULE");
  const std::string text = v ? v : "lockstep";
  if (text == "lockstep" || text == "lockstep-reverse" || text == "warps" || text == "warps-reverse") {
    s.lockstep = text.rfind("lockstep", 0) == 0;
    s.order = text.find("-reverse") != std::string::npos ? Schedule::Reverse : Schedule::Forward;
    return s;
  }
  if (text.rfind("shuffled:", 0) == 0 && text.size() > 9 &&
      text.find_first_not_of("0123456789", 9) == std::string::npos) {
    s.order = Schedule::Shuffled;
    s.lockstep = false;
    s.seed = std::stoull(text.substr(9));
    return s;
  }
  throw std::runtime_error(
      "EPAMX_CUDA_EMU_SCHEDULE must be lockstep, lockstep-reverse, warps, warps-reverse or shuffled:SEED (SEED a "
      "whole number), got '" + text + "'");
}

std::vector<int> order(int n, const Schedule& s, uint64_t salt) {
  std::vector<int> o(n);
  std::iota(o.begin(), o.end(), 0);
  if (s.order == Schedule::Reverse) std::reverse(o.begin(), o.end());
  if (s.order == Schedule::Shuffled)
    std::shuffle(o.begin(), o.end(), std::mt19937_64(s.seed * 0x9E3779B97F4A7C15ULL + salt));
  return o;
}

std::string where(const char* site, const uint3& block) {
  std::ostringstream os;
  os << "CUDA emulator: kernel launched at " << site << ", block (" << block.x << ", " << block.y << ", " << block.z
     << "): ";
  return os.str();
}

// Why no thread of the block can go on: what each group of threads waits at.
std::string stuck(const Block& b) {
  std::ostringstream os;
  int sync = 0, done = 0;
  for (const Fiber& f : b.fibers) sync += f.state == State::AtSync, done += f.state == State::Done;
  os << "no thread can go on (a hang or undefined behaviour on a GPU): " << sync << " of " << b.threads
     << " threads wait at __syncthreads(), " << done << " have returned";
  for (int w = 0; w * kWarp < b.threads; ++w) {
    int at = 0;
    for (int l = w * kWarp; l < std::min(b.threads, (w + 1) * kWarp); ++l) at += b.fibers[l].state == State::AtShuffle;
    if (at == 0) continue;
    os << "; warp " << w << ": " << at << " of " << std::min(kWarp, b.threads - w * kWarp) << " lanes wait at "
       << "a shuffle";
    std::set<std::string> kinds;
    for (int l = w * kWarp; l < std::min(b.threads, (w + 1) * kWarp); ++l)
      if (b.fibers[l].state == State::AtShuffle)
        kinds.insert(std::string(b.fibers[l].shuffle_kind) + " of " + std::to_string(b.fibers[l].shuffle_bytes) +
                     " bytes");
    for (const auto& k : kinds) os << " (" << k << ")";
  }
  return os.str();
}

void run_block(Block& b, const Config& c, const uint3& block_idx, const Schedule& s, uint64_t salt, const char* site) {
  g_context.block_idx = block_idx;
  b.poisoned.clear();
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack(t);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = State::Ready;
    f.shuffles = 0;
  }
  // Each warp's lanes in the schedule's order, and the warps in the order their first lanes come in.
  const int warps = (b.threads + kWarp - 1) / kWarp;
  std::vector<std::vector<int>> lanes(warps);
  std::vector<int> warp_turn;
  for (int t : order(b.threads, s, salt)) {
    if (lanes[t / kWarp].empty()) warp_turn.push_back(t / kWarp);
    lanes[t / kWarp].push_back(t);
  }
  const auto run_ready = [&](int w) {  // runs each ready lane of warp w to its next barrier; false if none was ready
    bool ran = false;
    for (int t : lanes[w]) {
      if (b.fibers[t].state != State::Ready) continue;
      b.current = t;
      g_context.thread_idx = unflatten(t, c.block);
      swapcontext(&b.scheduler, &b.fibers[t].ctx);
      if (!b.error.empty()) throw std::runtime_error(where(site, block_idx) + b.error);
      ran = true;
    }
    return ran;
  };
  // A warp whose 32 lanes all wait at the same shuffle (intrinsic and value size) goes on.
  const auto release_shuffle = [&](int w) {
    const int first = w * kWarp, last = std::min(b.threads, first + kWarp);
    bool all = last - first == kWarp;
    for (int l = first; all && l < last; ++l)
      all = b.fibers[l].state == State::AtShuffle && b.fibers[l].shuffle_kind == b.fibers[first].shuffle_kind &&
            b.fibers[l].shuffle_bytes == b.fibers[first].shuffle_bytes;
    if (all)
      for (int l = first; l < last; ++l) b.fibers[l].state = State::Ready;
    return all;
  };
  for (;;) {
    bool progressed = false;
    if (s.lockstep) {
      for (int w : warp_turn) progressed |= run_ready(w);
      for (int w : warp_turn) progressed |= release_shuffle(w);
    } else {
      for (int w : warp_turn)
        while (run_ready(w) || release_shuffle(w)) progressed = true;
    }
    if (progressed) continue;
    int done = 0, sync = 0;
    for (const Fiber& f : b.fibers) done += f.state == State::Done, sync += f.state == State::AtSync;
    if (done == b.threads) return;
    if (sync == b.threads) {
      for (Fiber& f : b.fibers) f.state = State::Ready;
      continue;
    }
    throw std::runtime_error(where(site, block_idx) + stuck(b));
  }
}

}  // namespace

const ThreadContext& context() { return g_context; }

void run_grid(const Config& c, const char* site, const std::function<void()>& body) {
  const int64_t threads = int64_t(c.block.x) * c.block.y * c.block.z;
  const int64_t blocks = int64_t(c.grid.x) * c.grid.y * c.grid.z;
  if (threads < 1 || threads > kMaxThreads || c.block.z > 64)
    throw std::runtime_error(std::string("CUDA emulator: kernel launched at ") + site + ": a block of " +
                             std::to_string(threads) + " threads (a GPU takes 1 to 1024)");
  if (blocks < 1 || c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535)
    throw std::runtime_error(std::string("CUDA emulator: kernel launched at ") + site + ": a grid of " +
                             std::to_string(blocks) + " blocks out of a GPU's range");
  if (blocks > (int64_t(1) << 24))
    throw std::runtime_error(std::string("CUDA emulator: kernel launched at ") + site + ": a grid of " +
                             std::to_string(blocks) + " blocks, more than the emulator runs (2^24)");
  if (c.shared_bytes != 0)
    throw std::runtime_error(std::string("CUDA emulator: kernel launched at ") + site +
                             ": dynamic shared memory is not emulated");
  if (g_block != nullptr) throw std::runtime_error("CUDA emulator: a launch from inside a kernel");
  const Schedule s = schedule_from_env();
  Block b;
  b.threads = static_cast<int>(threads);
  b.fibers.resize(b.threads);
  b.slots[0].resize(b.threads);
  b.slots[1].resize(b.threads);
  b.body = &body;
  g_block = &b;
  g_context.block_dim = c.block;
  g_context.grid_dim = c.grid;
  // Shuffled orders drawn from the seed and the launch's site and shape alone: a launch runs in the same order
  // whatever ran before it, so a failure repeats when its test runs alone.
  const uint64_t launch = std::hash<std::string>{}(site) ^ (uint64_t(blocks) << 32) ^ uint64_t(threads);
  try {
    for (int i : order(static_cast<int>(blocks), s, ~launch))
      run_block(b, c, unflatten(i, c.grid), s, launch * 1000003 + i, site);
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

void sync_threads() {
  if (g_block == nullptr) throw std::runtime_error("CUDA emulator: __syncthreads() outside a kernel");
  park(State::AtSync);
}

int lane_id() { return g_block->current % kWarp; }

void shuffle(unsigned int mask, const void* value, size_t bytes, int src_lane, void* result, const char* kind) {
  Block& b = *g_block;
  const int t = b.current, warp_first = t - t % kWarp;
  if (mask != 0xffffffffu) fail_thread(std::string(kind) + " with a mask of other than all 32 lanes (not emulated)");
  if (warp_first + kWarp > b.threads)
    fail_thread(std::string(kind) + " in a partial warp (the block's last), whose full mask names absent lanes");
  if (bytes > kSlotBytes) fail_thread(std::string(kind) + " of a value over 16 bytes (not emulated)");
  Fiber& f = b.fibers[t];
  auto& bank = b.slots[f.shuffles++ % 2];
  std::memcpy(bank[t].data(), value, bytes);
  f.shuffle_kind = kind;
  f.shuffle_bytes = bytes;
  park(State::AtShuffle);  // every lane of the warp has stored its value
  const int src = src_lane >= 0 && src_lane < kWarp ? warp_first + src_lane : t;
  std::memcpy(result, bank[src].data(), bytes);
}

void kernel_assert_failed(const char* condition, const char* file, int line) {
  const std::string what =
      std::string("CUDA_KERNEL_ASSERT(") + condition + ") failed at " + file + ":" + std::to_string(line);
  if (g_block == nullptr) throw std::runtime_error("CUDA emulator: " + what);
  fail_thread(what);
}

void poison_shared(void* p, size_t bytes) {
  if (g_block != nullptr && g_block->poisoned.insert(p).second) std::memset(p, 0xFF, bytes);
}

bool mark_kernel(const char* name, const char* signature) {
  const std::string s = signature;
  const bool int64 = s.find("index_t = long") != std::string::npos;
  const bool int32 = s.find("index_t = int") != std::string::npos;
  g_kernels_run.insert(std::string(name) + (int64 ? "/int64" : int32 ? "/int32" : ""));
  return true;
}

bool narrow_index() {
  const char* v = std::getenv("EPAMX_CUDA_EMU_INDEX");
  const std::string text = v ? v : "int32";
  if (text != "int32" && text != "int64")
    throw std::runtime_error("EPAMX_CUDA_EMU_INDEX must be int32 or int64, got '" + text + "'");
  return text == "int32";
}

const at::Tensor* index_probe() {
  static const at::Tensor none, wide = at::zeros({1}).expand({int64_t(1) << 32});
  return narrow_index() ? &none : &wide;
}

}  // namespace epamx_emu

namespace {
std::vector<std::string> kernels_run() { return {epamx_emu::g_kernels_run.begin(), epamx_emu::g_kernels_run.end()}; }
}  // namespace

TORCH_LIBRARY_FRAGMENT(epamx_emu, m) { m.def("_kernels_run() -> str[]", &kernels_run); }
