// The CUDA execution model on the CPU, for the kernels of csrc/cuda/ compiled as host C++
// (RLA_EXT_EMULATE_CUDA; included only by ../device.cuh). What a kernel may use is exactly what this
// header defines: threadIdx / blockIdx / blockDim / gridDim, __syncthreads(), shared memory through
// RLA_SHARED (device.cuh), the qualifiers below, min/max and <cmath>. Anything else (warp shuffles,
// atomics, intrinsics) fails to compile here, which is the signal to extend the emulator first.
//
// A launch runs its blocks one after another. A block's threads run as fibers on one OS thread,
// switched only at __syncthreads() (in order, or in a shuffled order after every barrier), or as real
// threads meeting at a real barrier. See runtime.cpp for the checks made around every launch.
#pragma once

#include <ATen/ATen.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __syncthreads() ::rla_ext::emulate::syncthreads(__LINE__)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's device-side min/max overloads.
using std::max;
using std::min;

namespace rla_ext {
namespace emulate {

// What threadIdx and friends read: the running thread's coordinates.
struct ThreadCoords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
const ThreadCoords& coords();

void syncthreads(int line);

// Shared memory of the running block. Static arrays are keyed by their declaration site; both kinds are
// poisoned (0xFF bytes: NaN in every float type) before every block and fenced by checked guard bytes.
void* shared_static(const void* site, const char* name, size_t bytes, size_t align);
void* shared_dynamic();

// `shrink` bytes fewer than the array's size are allocated (only for mutants, below).
template <typename Array>
Array& shared_static_array(const void* site, const char* name, size_t shrink = 0) {
  return *static_cast<Array*>(shared_static(site, name, sizeof(Array) - shrink, alignof(Array)));
}

// Mutation testing (tests/csrc/emulate/test_mutants.py) compiles a copy of the kernels in which every
// mutation site is guarded by RLA_EMULATE_MUTANT(id); mutant `id` is live when RLA_EXT_EMULATE_MUTANT=id.
bool mutant(int id);

// Runs `thread` for every thread of every block of the grid. Throws std::runtime_error, naming the
// kernel, for anything the GPU would reject or leave undefined that the emulator can see.
void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& thread);

// NaN into floating tensors, 0xA5 bytes into the others.
at::Tensor poison(at::Tensor t);

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

// Knobs (module.cpp exposes them to Python).
enum class Schedule { kInOrder, kShuffled, kThreaded };
struct Settings {
  Schedule schedule = Schedule::kInOrder;
  uint64_t seed = 0;
  int multiprocessor_count = 2;  // small, so grid-stride loops take several turns on test shapes
  int mutant = -1;                // from RLA_EXT_EMULATE_MUTANT
};
Settings& settings();
int64_t multiprocessor_count();

// One entry per launch since the last clear (for tests that check what ran).
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t dynamic_smem = 0;
  size_t static_smem = 0;
  uint64_t barriers = 0;  // barrier episodes over all blocks
};
std::vector<LaunchRecord>& launch_log();

}  // namespace emulate
}  // namespace rla_ext

#define threadIdx (::rla_ext::emulate::coords().thread_idx)
#define blockIdx (::rla_ext::emulate::coords().block_idx)
#define blockDim (::rla_ext::emulate::coords().block_dim)
#define gridDim (::rla_ext::emulate::coords().grid_dim)

#define RLA_SHARED_static(T, name, dims)          \
  static const char rla_shared_site_##name = 0; \
  T(&name) dims = ::rla_ext::emulate::shared_static_array<T dims>(&rla_shared_site_##name, #name)
#define RLA_SHARED_extern(T, name, dims) T* const name = static_cast<T*>(::rla_ext::emulate::shared_dynamic())

#define RLA_EMULATE_MUTANT(id) (::rla_ext::emulate::mutant(id))
// A static shared array whose storage is one element short while mutant `id` is live.
#define RLA_SHARED_SHRUNK_IF_MUTANT(id, T, name, dims)                                            \
  static const char rla_shared_site_##name = 0;                                                   \
  T(&name) dims = ::rla_ext::emulate::shared_static_array<T dims>(                                \
      &rla_shared_site_##name, #name, ::rla_ext::emulate::mutant(id) ? sizeof(std::remove_all_extents_t<T dims>) : 0)
