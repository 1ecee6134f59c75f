// The emulator behind runtime.h. Per launch:
//   * the configuration is checked against the GPU's limits (device.cuh checks the launch arguments;
//     shared memory is checked here as the kernel declares it: static <= 48 KiB, static + dynamic
//     <= 227 KiB (sm_90));
//   * before every block, all its shared memory is filled with 0xFF bytes (NaN in every float type)
//     and fenced by guard bytes that are checked after the block (an out-of-bounds shared write fails
//     the launch; under AddressSanitizer the arrays are exact-size heap blocks instead);
//   * the block's threads run as fibers that switch only at __syncthreads(), in thread order or in a
//     fresh random order after every barrier (blocks in random order too), or as real threads;
//   * every barrier must be reached by all threads of the block at the same __syncthreads() (a thread
//     that returns while others wait, or two sites at once, is undefined on a GPU and fails here).
// Any failure aborts the launch and surfaces as a std::runtime_error naming the kernel.

// Fibers switch with _setjmp/_longjmp between stacks, which glibc's fortified longjmp refuses.
#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif

#include "runtime.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#if defined(__SANITIZE_ADDRESS__)
#define RLA_EMULATE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RLA_EMULATE_ASAN 1
#endif
#endif
#ifdef RLA_EMULATE_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace rla_ext {
namespace emulate {
namespace {

constexpr unsigned char kPoisonByte = 0xFF;  // NaN as float, double, half and bfloat16
#ifdef RLA_EMULATE_ASAN
constexpr size_t kGuardBytes = 0;  // AddressSanitizer's own redzones fence exact-size blocks
constexpr size_t kFiberStackBytes = 1024 * 1024;
#else
constexpr size_t kGuardBytes = 64;
constexpr size_t kFiberStackBytes = 256 * 1024;
#endif
constexpr size_t kMaxStaticSmem = 48 * 1024;
constexpr size_t kMaxSmemPerBlock = 232448;  // 227 KiB: sm_90's opt-in maximum per block
constexpr int kExitSite = -1;                // "barrier" site of a thread that returned

// Unwinds the threads of an aborted launch.
struct Abort {};

std::string short_kernel_name(const char* pretty) {
  std::string s(pretty);
  for (const char* prefix : {"rla_ext::cuda::", "{anonymous}::", "(anonymous namespace)::"}) {
    for (size_t p; (p = s.find(prefix)) != std::string::npos;) s.erase(p, std::strlen(prefix));
  }
  return s;
}

// A block of memory with guard bytes on both sides, all poisoned before every block.
class Region {
 public:
  explicit Region(size_t bytes) : bytes_(bytes) {
    const size_t total = std::max<size_t>(1, bytes + 2 * kGuardBytes);
    base_ = static_cast<unsigned char*>(::operator new(total, std::align_val_t(64)));
  }
  ~Region() { ::operator delete(base_, std::align_val_t(64)); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  unsigned char* data() const { return base_ + kGuardBytes; }
  size_t bytes() const { return bytes_; }
  void poison() { std::memset(base_, kPoisonByte, bytes_ + 2 * kGuardBytes); }
  // Bytes written before the start / past the end (0 when the guards are intact).
  std::pair<size_t, size_t> overrun() const {
    size_t before = 0, after = 0;
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (base_[i] != kPoisonByte) before = kGuardBytes - i > before ? kGuardBytes - i : before;
      if (base_[kGuardBytes + bytes_ + i] != kPoisonByte) after = i + 1;
    }
    return {before, after};
  }

 private:
  size_t bytes_;
  unsigned char* base_;
};

struct StaticArray {
  const void* site;
  std::string name;
  std::unique_ptr<Region> region;
};

// State of one launch, shared by all its threads.
struct Launch {
  std::string kernel;
  dim3 grid, block;
  unsigned threads = 0;
  const std::function<void()>* body = nullptr;
  std::unique_ptr<Region> dynamic;
  std::vector<StaticArray> statics;
  size_t static_bytes = 0;
  uint64_t barriers = 0;
  std::mutex mu;  // statics, error
  std::string error;
  std::atomic<bool> aborted{false};

  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu);
    if (error.empty()) error = msg;
    aborted.store(true);
  }

  void begin_block() {
    std::lock_guard<std::mutex> lock(mu);
    if (dynamic) dynamic->poison();
    for (auto& s : statics) s.region->poison();
  }

  // Guard bytes of every shared array after a block.
  void end_block(const uint3& b) {
    std::ostringstream msg;
    auto check = [&](const Region& r, const std::string& what) {
      const auto [before, after] = r.overrun();
      if (before || after) {
        msg << "block (" << b.x << ", " << b.y << ", " << b.z << ") wrote outside " << what << " ("
            << r.bytes() << " bytes): " << before << " byte(s) before it, " << after << " byte(s) past its end";
      }
    };
    {
      std::lock_guard<std::mutex> lock(mu);
      if (dynamic) check(*dynamic, "the dynamic shared memory");
      for (auto& s : statics) {
        if (msg.tellp() == 0) check(*s.region, "the shared array '" + s.name + "'");
      }
    }
    if (msg.tellp() > 0) fail(msg.str());
  }
};

// How the running thread waits at __syncthreads().
class Barrier {
 public:
  virtual ~Barrier() = default;
  virtual void wait(int line) = 0;
};

thread_local Launch* t_launch = nullptr;
thread_local const ThreadCoords* t_coords = nullptr;
thread_local Barrier* t_barrier = nullptr;

// The kernel body for the current coordinates; failures abort the launch, never escape a thread.
void run_thread(Launch& L) {
  try {
    (*L.body)();
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    L.fail(e.what());
  } catch (...) {
    L.fail("unknown exception in a kernel thread");
  }
}

ThreadCoords coords_of(const Launch& L, unsigned tid, const uint3& b) {
  ThreadCoords c;
  c.thread_idx = {tid % L.block.x, (tid / L.block.x) % L.block.y, tid / (L.block.x * L.block.y)};
  c.block_idx = b;
  c.block_dim = L.block;
  c.grid_dim = L.grid;
  return c;
}

std::string barrier_mismatch(const Launch& L, const uint3& b, int site_a, int site_b) {
  std::ostringstream msg;
  auto what = [](int site) {
    return site == kExitSite ? std::string("returned") : "waited at the __syncthreads() of line " + std::to_string(site);
  };
  msg << "block (" << b.x << ", " << b.y << ", " << b.z << "): some threads " << what(site_a) << " while others "
      << what(site_b) << " (a barrier must be reached by every thread of the block)";
  return msg.str();
}

// ------------------------------------------------------------------------------------------ fibers

// Stacks are mmap'ed once per OS thread and reused; a PROT_NONE page below each catches overflows.
class StackPool {
 public:
  ~StackPool() {
    for (void* s : stacks_) munmap(static_cast<char*>(s) - page(), kFiberStackBytes + page());
  }
  void* get(size_t i) {
    while (stacks_.size() <= i) {
      void* m = mmap(nullptr, kFiberStackBytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED) throw std::runtime_error("rla_ext emulate: cannot map a fiber stack");
      mprotect(m, page(), PROT_NONE);
      stacks_.push_back(static_cast<char*>(m) + page());
    }
    return stacks_[i];
  }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<void*> stacks_;
};

struct Fiber {
  enum State { kReady, kAtBarrier, kDone };
  jmp_buf env;
  ucontext_t start;
  void* stack = nullptr;
  bool started = false;
  State state = kReady;
  int line = 0;
  ThreadCoords coords;
#ifdef RLA_EMULATE_ASAN
  void* fake_stack = nullptr;
#endif
};

class FiberRunner;
thread_local FiberRunner* t_runner = nullptr;
thread_local Fiber* t_fiber = nullptr;

class FiberRunner : public Barrier {
 public:
  FiberRunner(Launch& L, bool shuffle, uint64_t seed) : L_(L), shuffle_(shuffle), rng_(seed), fibers_(L.threads) {
    thread_local StackPool pool;
    for (unsigned t = 0; t < L.threads; ++t) {
      Fiber& f = fibers_[t];
      f.stack = pool.get(t);
#ifdef RLA_EMULATE_ASAN
      ASAN_UNPOISON_MEMORY_REGION(f.stack, kFiberStackBytes);  // frames abandoned by an earlier abort
#endif
      getcontext(&f.start);
      f.start.uc_stack.ss_sp = f.stack;
      f.start.uc_stack.ss_size = kFiberStackBytes;
      f.start.uc_link = nullptr;
      makecontext(&f.start, &FiberRunner::entry, 0);
    }
  }

  void run(const std::vector<uint3>& blocks) {
    FiberRunner* const saved_runner = t_runner;
    t_runner = this;
    t_barrier = this;
    for (const uint3& b : blocks) {
      if (L_.aborted) break;
      run_block(b);
      if (!L_.aborted) L_.end_block(b);
    }
    t_runner = saved_runner;
  }

  void wait(int line) override {
    Fiber* f = t_fiber;
    f->state = Fiber::kAtBarrier;
    f->line = line;
    yield(f);
    if (L_.aborted) throw Abort{};
  }

 private:
  void run_block(const uint3& b) {
    L_.begin_block();
    std::vector<unsigned> order(L_.threads);
    std::iota(order.begin(), order.end(), 0u);
    for (unsigned t = 0; t < L_.threads; ++t) {
      fibers_[t].state = Fiber::kReady;
      fibers_[t].coords = coords_of(L_, t, b);
    }
    for (;;) {
      if (shuffle_) std::shuffle(order.begin(), order.end(), rng_);
      for (unsigned t : order) {
        resume(&fibers_[t]);
        if (L_.aborted) return;
      }
      unsigned waiting = 0, done = 0;
      int site = 0;
      for (const Fiber& f : fibers_) {
        if (f.state == Fiber::kDone) {
          ++done;
        } else {
          if (waiting++ > 0 && f.line != site) {
            L_.fail(barrier_mismatch(L_, b, site, f.line));
            return;
          }
          site = f.line;
        }
      }
      if (waiting == 0) return;
      if (done > 0) {
        L_.fail(barrier_mismatch(L_, b, site, kExitSite));
        return;
      }
      ++L_.barriers;
      for (Fiber& f : fibers_) f.state = Fiber::kReady;
    }
  }

  // Runs fiber f until it waits at a barrier or finishes its thread.
  void resume(Fiber* f) {
    t_fiber = f;
    t_coords = &f->coords;
#ifdef RLA_EMULATE_ASAN
    __sanitizer_start_switch_fiber(&sched_fake_stack_, f->stack, kFiberStackBytes);
#endif
    if (_setjmp(sched_env_) == 0) {
      if (!f->started) {
        f->started = true;
        setcontext(&f->start);
      } else {
        _longjmp(f->env, 1);
      }
    }
#ifdef RLA_EMULATE_ASAN
    __sanitizer_finish_switch_fiber(sched_fake_stack_, nullptr, nullptr);
#endif
    t_fiber = nullptr;
  }

  // Back to the scheduler; returns when the scheduler resumes f.
  void yield(Fiber* f) {
#ifdef RLA_EMULATE_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, sched_stack_bottom_, sched_stack_size_);
#endif
    if (_setjmp(f->env) == 0) _longjmp(sched_env_, 1);
#ifdef RLA_EMULATE_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
  }

  static void entry() {
    FiberRunner* r = t_runner;
    Fiber* f = t_fiber;
#ifdef RLA_EMULATE_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &r->sched_stack_bottom_, &r->sched_stack_size_);
#endif
    for (;;) {  // one turn per block; the fiber lives as long as the launch
      run_thread(r->L_);
      f->state = Fiber::kDone;
      r->yield(f);
    }
  }

  Launch& L_;
  bool shuffle_;
  std::mt19937_64 rng_;
  std::vector<Fiber> fibers_;
  jmp_buf sched_env_;
#ifdef RLA_EMULATE_ASAN
  void* sched_fake_stack_ = nullptr;
  const void* sched_stack_bottom_ = nullptr;
  size_t sched_stack_size_ = 0;
#endif
};

// -------------------------------------------------------------------------------- real threads

class ThreadedRunner : public Barrier {
 public:
  explicit ThreadedRunner(Launch& L) : L_(L) {}

  void run(const std::vector<uint3>& blocks) {
    blocks_ = &blocks;
    if (!blocks.empty()) L_.begin_block();
    std::vector<std::thread> workers;
    workers.reserve(L_.threads);
    for (unsigned t = 0; t < L_.threads; ++t) workers.emplace_back([this, t] { work(t); });
    for (auto& w : workers) w.join();
  }

  void wait(int line) override { arrive(line); }

 private:
  void work(unsigned tid) {
    t_launch = &L_;
    t_barrier = this;
    for (size_t i = 0; i < blocks_->size(); ++i) {
      const ThreadCoords c = coords_of(L_, tid, (*blocks_)[i]);
      t_coords = &c;
      run_thread(L_);
      t_coords = nullptr;
      if (L_.aborted) break;
      try {
        arrive(kExitSite);
      } catch (const Abort&) {
        break;
      }
    }
    t_launch = nullptr;
    t_barrier = nullptr;
  }

  // A real barrier; the last thread to arrive at the end of a block checks it and prepares the next.
  void arrive(int site) {
    std::unique_lock<std::mutex> lock(mu_);
    if (L_.aborted) throw Abort{};
    if (arrived_ == 0) {
      site_ = site;
    } else if (site != site_) {
      L_.fail(barrier_mismatch(L_, (*blocks_)[block_], site_, site));
      cv_.notify_all();
      throw Abort{};
    }
    if (++arrived_ == L_.threads) {
      arrived_ = 0;
      ++generation_;
      if (site == kExitSite) {
        L_.end_block((*blocks_)[block_]);
        if (++block_ < blocks_->size()) L_.begin_block();
      } else {
        ++L_.barriers;
      }
      cv_.notify_all();
      return;
    }
    const uint64_t gen = generation_;
    while (generation_ == gen) {
      if (L_.aborted) throw Abort{};
      cv_.wait_for(lock, std::chrono::milliseconds(20));  // polls for aborts raised outside this barrier
    }
  }

  Launch& L_;
  const std::vector<uint3>* blocks_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned arrived_ = 0;
  uint64_t generation_ = 0;
  int site_ = 0;
  size_t block_ = 0;
};

}  // namespace

// ------------------------------------------------------------------------------------ the API

const ThreadCoords& coords() {
  if (t_coords == nullptr) throw std::logic_error("rla_ext emulate: threadIdx/blockIdx read outside a kernel");
  return *t_coords;
}

void syncthreads(int line) {
  if (t_barrier == nullptr || t_launch == nullptr) throw std::logic_error("rla_ext emulate: __syncthreads() outside a kernel");
  if (t_launch->aborted) throw Abort{};
  t_barrier->wait(line);
}

void* shared_static(const void* site, const char* name, size_t bytes, size_t align) {
  Launch* L = t_launch;
  if (L == nullptr) throw std::logic_error("rla_ext emulate: shared memory declared outside a kernel");
  std::lock_guard<std::mutex> lock(L->mu);
  for (auto& s : L->statics) {
    if (s.site == site) return s.region->data();
  }
  if (align > 64) throw std::runtime_error("rla_ext emulate: shared array alignment above 64 bytes");
  // Checked before it is counted: a declaration over the limit is never registered, so with the
  // threaded schedule every thread of the block that reaches it before the abort would otherwise add
  // its bytes again and report a multiple of the real size.
  const size_t total = L->static_bytes + bytes;
  const size_t dyn = L->dynamic ? L->dynamic->bytes() : 0;
  if (total > kMaxStaticSmem) {
    throw std::runtime_error("static shared memory of " + std::to_string(total) +
                             " bytes exceeds the 48 KiB limit (at '" + name + "')");
  }
  if (total + dyn > kMaxSmemPerBlock) {
    throw std::runtime_error("static (" + std::to_string(total) + ") + dynamic (" + std::to_string(dyn) +
                             ") shared memory exceeds 227 KiB (232448 bytes)");
  }
  L->static_bytes = total;
  StaticArray s{site, name, std::make_unique<Region>(bytes)};
  s.region->poison();
  L->statics.push_back(std::move(s));
  return L->statics.back().region->data();
}

void* shared_dynamic() {
  Launch* L = t_launch;
  if (L == nullptr) throw std::logic_error("rla_ext emulate: shared memory declared outside a kernel");
  if (!L->dynamic) throw std::runtime_error("dynamic shared memory declared but the launch gave 0 bytes");
  return L->dynamic->data();
}

void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& thread) {
  Launch L;
  L.kernel = short_kernel_name(kernel);
  L.grid = grid;
  L.block = block;
  L.threads = block.x * block.y * block.z;
  L.body = &thread;
  auto fail_now = [&](const std::string& why) {
    throw std::runtime_error("rla_ext emulate: launch of " + L.kernel + ": " + why);
  };
  if (L.threads == 0 || L.threads > 1024) fail_now("bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    fail_now("bad grid size");
  }
  if (dynamic_smem > kMaxSmemPerBlock) fail_now("dynamic shared memory above 227 KiB");
  if (dynamic_smem > 0) L.dynamic = std::make_unique<Region>(dynamic_smem);

  const Settings& cfg = settings();
  std::vector<uint3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
    }
  }
  static uint64_t launch_counter = 0;
  const uint64_t seed = cfg.seed * 0x9E3779B97F4A7C15ull + (++launch_counter);

  Launch* const saved_launch = t_launch;
  const ThreadCoords* const saved_coords = t_coords;
  Barrier* const saved_barrier = t_barrier;
  if (cfg.schedule == Schedule::kThreaded) {
    ThreadedRunner(L).run(blocks);
  } else {
    if (cfg.schedule == Schedule::kShuffled) {
      std::mt19937_64 rng(seed ^ 0xB10C5ull);
      std::shuffle(blocks.begin(), blocks.end(), rng);
    }
    t_launch = &L;
    FiberRunner(L, cfg.schedule == Schedule::kShuffled, seed).run(blocks);
  }
  t_launch = saved_launch;
  t_coords = saved_coords;
  t_barrier = saved_barrier;

  LaunchRecord rec;
  rec.kernel = L.kernel;
  rec.grid = grid;
  rec.block = block;
  rec.dynamic_smem = dynamic_smem;
  rec.static_smem = L.static_bytes;
  rec.barriers = L.barriers;
  launch_log().push_back(rec);
  if (L.aborted) fail_now(L.error);
}

at::Tensor poison(at::Tensor t) {
  if (t.numel() == 0) return t;
  if (t.is_floating_point()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    std::memset(t.data_ptr(), 0xA5, t.storage().nbytes() - t.storage_offset() * t.element_size());
  }
  return t;
}

Settings& settings() {
  static Settings s = [] {
    Settings init;
    if (const char* m = std::getenv("RLA_EXT_EMULATE_MUTANT")) init.mutant = std::atoi(m);
    return init;
  }();
  return s;
}

bool mutant(int id) { return settings().mutant == id; }

int64_t multiprocessor_count() { return settings().multiprocessor_count; }

std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

}  // namespace emulate
}  // namespace rla_ext
