// Everything the kernel sources of csrc/cuda/ take from the CUDA runtime and from ATen's CUDA layer, in
// ONE header: kernel launches, shared memory, the stream, the device guard, device properties, launch
// error checks, output allocation and the few GEMM overloads that exist only for CUDA tensors.
//
// The same kernel sources compile two ways:
//   * nvcc (the real extension): this header maps everything to CUDA and ATen-CUDA;
//   * host C++ with RLA_EXT_EMULATE_CUDA defined (csrc/cuda/emulate/, tests/csrc/emulate/): the kernels
//     run on CPU tensors under an emulator of the CUDA execution model (threads as fibers with real
//     barriers, poisoned shared memory and outputs, launch-limit checks).
// Rules that keep a kernel emulatable are in docs/ARCHITECTURE.md ("Keeping the CUDA kernels emulatable").
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#ifdef RLA_EXT_EMULATE_CUDA
#include "emulate/runtime.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

// Shared memory, static or dynamic, is declared through this one macro:
//   RLA_SHARED(static, State, sh, [TY][TX]);        // __shared__ State sh[TY][TX];
//   RLA_SHARED(extern, unsigned char, raw, []);     // extern __shared__ __align__(16) unsigned char raw[];
#define RLA_SHARED(kind, T, name, dims) RLA_SHARED_##kind(T, name, dims)
#ifndef RLA_EXT_EMULATE_CUDA
#define RLA_SHARED_static(T, name, dims) __shared__ T name dims
#define RLA_SHARED_extern(T, name, dims) extern __shared__ __align__(16) T name dims
#endif

namespace rla_ext {
namespace cuda {

// Limits of the target GPUs (sm_90 where they differ between architectures).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 2147483647u;  // 2^31 - 1
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxDefaultDynamicSmem = 48 * 1024;  // more needs cudaFuncSetAttribute, which launch() never does

// "<kernel><template args>" from the compiler's name of this function (error messages, emulator log).
template <auto Kernel>
inline const char* kernel_name() {
  static const std::string name = [](std::string s) {
    const auto at = s.find("Kernel = ");
    if (at == std::string::npos) return s;
    s = s.substr(at + 9);
    if (!s.empty() && s.back() == ']') s.pop_back();
    return s;
  }(__PRETTY_FUNCTION__);
  return name.c_str();
}

// A launch configuration the GPU would reject fails here, with the numbers, before anything runs.
inline void check_launch_config(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "rla_ext: launch of ", kernel, " with an empty grid (",
              grid.x, ", ", grid.y, ", ", grid.z, "); the caller must skip launches with no work");
  TORCH_CHECK(grid.x <= kMaxGridX && grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ, "rla_ext: launch of ", kernel,
              ": grid (", grid.x, ", ", grid.y, ", ", grid.z, ") exceeds (2^31-1, 65535, 65535)");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock && block.z <= 64, "rla_ext: launch of ", kernel,
              ": block (", block.x, ", ", block.y, ", ", block.z, ") has ", threads,
              " threads (1..1024 allowed, z <= 64)");
  TORCH_CHECK(dynamic_smem <= kMaxDefaultDynamicSmem, "rla_ext: launch of ", kernel, " asks for ", dynamic_smem,
              " bytes of dynamic shared memory; more than 48 KiB needs an opt-in that launch() does not make");
}

#ifdef RLA_EXT_EMULATE_CUDA

using DeviceGuard = emulate::DeviceGuard;
// The emulated kernels run on CPU tensors.
inline bool is_device_tensor(const at::Tensor& t) { return t.is_cpu(); }
inline int64_t multiprocessor_count() { return emulate::multiprocessor_count(); }
// Outputs and workspaces start as NaN (a byte pattern for integers): an element no kernel writes shows.
inline at::Tensor fresh(at::Tensor t) { return emulate::poison(std::move(t)); }

// Every kernel launch goes through launch<kernel<explicit, template, args>>(grid, block, smem, args...).
template <auto Kernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t dynamic_smem, Args&&... args) {
  const char* name = kernel_name<Kernel>();
  check_launch_config(name, grid, block, dynamic_smem);
  emulate::launch(name, grid, block, dynamic_smem, [&] { Kernel(args...); });
}

// out = a @ b with out's dtype as the output (and accumulation) dtype, a and b possibly of a lower
// precision: products of half values are exact in float, so converting first is the same computation.
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
}
inline void bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::bmm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
}

#else  // the real CUDA build

using DeviceGuard = c10::cuda::CUDAGuard;
inline bool is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }
inline int64_t multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline at::Tensor fresh(at::Tensor t) { return t; }

template <auto Kernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t dynamic_smem, Args&&... args) {
  check_launch_config(kernel_name<Kernel>(), grid, block, dynamic_smem);
  Kernel<<<grid, block, dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(static_cast<Args&&>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cuBLAS computes half-type GEMMs in float; these overloads return that float result unrounded.
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}
inline void bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::bmm_out(out, a, b);
  } else {
    at::bmm_out(out, a, b, out.scalar_type());
  }
}

#endif

// Allocation of every tensor a kernel or GEMM writes (never at::empty directly in csrc/cuda/).
inline at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return fresh(at::empty(sizes, options));
}
inline at::Tensor device_empty_like(const at::Tensor& t) { return fresh(at::empty_like(t)); }

}  // namespace cuda
}  // namespace rla_ext
