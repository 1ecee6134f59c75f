// Deliberately broken kernels: each shows that the emulator reports one class of defect (a check that
// cannot fire proves nothing). tests/csrc/emulate/test_emulator.py runs them by name.
#ifndef RLA_EXT_EMULATE_CUDA
#error "csrc/cuda/emulate/ is built only by the emulator (tests/cuda_emulation.py), with RLA_EXT_EMULATE_CUDA"
#endif
#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

#include "../device.cuh"

namespace rla_ext {
namespace cuda {
namespace selftest {

constexpr int kThreads = 64;

// Correct: out[b, t] = sum of the block's inputs, by a shared-memory tree.
template <bool kBarrier>
__global__ void block_sum_kernel(const float* in, float* out) {
  RLA_SHARED(static, float, sh, [kThreads]);
  const int t = threadIdx.x;
  sh[t] = in[blockIdx.x * kThreads + t];
  if (kBarrier) __syncthreads();  // without it, a thread reads neighbours that have not stored yet
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh[t] += sh[t + s];
    __syncthreads();
  }
  out[blockIdx.x * kThreads + t] = sh[0];
}

__global__ void exit_before_barrier_kernel(float* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shared_overflow_kernel(float* out) {
  RLA_SHARED(static, float, sh, [kThreads - 1]);
  sh[threadIdx.x] = 1.0f;  // the last thread writes one element past the end
  __syncthreads();
  out[threadIdx.x] = sh[0];
}

__global__ void dynamic_overflow_kernel(float* out, int n) {
  RLA_SHARED(extern, unsigned char, raw, []);
  float* f = reinterpret_cast<float*>(raw);
  f[threadIdx.x] = 1.0f;  // launched with room for n - 1 floats
  __syncthreads();
  out[threadIdx.x] = f[0] + static_cast<float>(n);
}

__global__ void big_static_smem_kernel(float* out) {
  RLA_SHARED(static, double, big, [6200]);  // 49600 bytes > 48 KiB
  big[threadIdx.x] = 1.0;
  out[threadIdx.x] = static_cast<float>(big[threadIdx.x]);
}

__global__ void half_written_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n / 2) out[i] = 1.0f;
}

// The order threads pass a barrier in: slot k of `out` gets the k-th thread to run after it.
// Fibers never run at the same time, so the plain increment is exact (not for the threaded mode).
__global__ void arrival_order_kernel(float* out, int* counter) {
  __syncthreads();
  const int slot = (*counter)++;
  out[slot] = static_cast<float>(threadIdx.x);
}

// Sanitizer cases: undefined behaviour the emulator itself cannot see.
__global__ void global_overflow_kernel(float* out) { out[threadIdx.x + 1] = 1.0f; }  // one past the end

__global__ void int_overflow_kernel(float* out) {
  int v = 2147483646;
  v += static_cast<int>(threadIdx.x);  // signed overflow from thread 2 on
  out[threadIdx.x] = static_cast<float>(v);
}

__global__ void noop_kernel(float* out) {
  if (out == nullptr) out[0] = 0.0f;
}

at::Tensor run(const std::string& name) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (name == "block_sum" || name == "missing_barrier") {
    const int blocks = 3;
    at::Tensor in = at::arange(blocks * kThreads, f32);
    at::Tensor out = device_empty({blocks * kThreads}, f32);
    if (name == "block_sum") {
      launch<block_sum_kernel<true>>(blocks, kThreads, 0, in.data_ptr<float>(), out.data_ptr<float>());
    } else {
      launch<block_sum_kernel<false>>(blocks, kThreads, 0, in.data_ptr<float>(), out.data_ptr<float>());
    }
    return out;
  }
  at::Tensor out = device_empty({kThreads}, f32);
  float* o = out.data_ptr<float>();
  if (name == "arrival_order") {
    at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
    launch<arrival_order_kernel>(1, kThreads, 0, o, counter.data_ptr<int>());
  } else if (name == "global_overflow" || name == "int_overflow") {
#if defined(__SANITIZE_ADDRESS__)
    if (name == "global_overflow") {
      launch<global_overflow_kernel>(1, kThreads, 0, o);
    } else {
      launch<int_overflow_kernel>(1, kThreads, 0, o);
    }
#else
    throw std::invalid_argument("selftest: '" + name + "' runs only in a sanitized build");
#endif
  } else if (name == "exit_before_barrier") {
    launch<exit_before_barrier_kernel>(1, kThreads, 0, o);
  } else if (name == "divergent_barrier") {
    launch<divergent_barrier_kernel>(1, kThreads, 0, o);
  } else if (name == "shared_overflow") {
    launch<shared_overflow_kernel>(1, kThreads, 0, o);
  } else if (name == "dynamic_overflow") {
    launch<dynamic_overflow_kernel>(1, kThreads, (kThreads - 1) * sizeof(float), o, kThreads);
  } else if (name == "big_static_smem") {
    launch<big_static_smem_kernel>(1, kThreads, 0, o);
  } else if (name == "unwritten_output") {
    launch<half_written_kernel>(1, kThreads, 0, o, kThreads);
  } else if (name == "too_many_threads") {
    launch<noop_kernel>(1, 1025, 0, o);
  } else if (name == "grid_y_too_big") {
    launch<noop_kernel>(dim3(1, 65536), kThreads, 0, o);
  } else if (name == "empty_grid") {
    launch<noop_kernel>(0, kThreads, 0, o);
  } else if (name == "dynamic_smem_over_48k") {
    launch<noop_kernel>(1, kThreads, 48 * 1024 + 16, o);
  } else {
    throw std::invalid_argument("selftest: unknown case '" + name + "'");
  }
  return out;
}

}  // namespace selftest
}  // namespace cuda
}  // namespace rla_ext
