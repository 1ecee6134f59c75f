// Runtime instruction-set dispatch for the CPU kernels' hot loops, as ATen does for its own.
//
// The extension is compiled for the baseline x86-64 ISA (it must load on any x86-64 CPU), so the
// fused loops would otherwise run 4-wide SSE. isa_dispatch(body) runs `body` inside one of three
// wrappers compiled for the baseline, AVX2+FMA and AVX-512 targets; `flatten` inlines the body (and
// the functors it calls) into each wrapper, so the same source is vectorised three ways. Function
// target attributes, not per-file -m flags: a file compiled with -mavx512f would also emit AVX-512
// copies of the inline functions of every header it includes (std::vector, ATen), and the linker may
// keep those copies for the whole library, which then faults on an older CPU.
//
// The variant is chosen once at load: the best the CPU runs, capped by $ATEN_CPU_CAPABILITY
// (default / avx2 / avx512) exactly as ATen caps its own kernels. Tests switch it through
// torch.ops.rla_ext.set_cpu_isa to check every variant the machine can run.
#pragma once

namespace rla_ext::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
Isa supported_isa();  // the best variant this CPU can run
Isa active_isa();     // the variant the hot loops use now

#if defined(__x86_64__) && defined(__GNUC__)
#define RLA_ISA_VARIANTS 1
#if defined(__clang__)
#define RLA_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#else
// GCC vectorises at 256 bits under plain -mavx512f (its tuning for older Intel parts); the 512-bit
// width is what makes this variant differ from the AVX2 one.
#define RLA_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"
#endif

template <typename Body>
__attribute__((target(RLA_TARGET_AVX512), flatten)) void run_avx512(const Body& body) {
  body();
}
template <typename Body>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const Body& body) {
  body();
}
template <typename Body>
__attribute__((flatten)) void run_default(const Body& body) {
  body();
}

template <typename Body>
inline void isa_dispatch(const Body& body) {
  switch (active_isa()) {
    case Isa::kAvx512: run_avx512(body); return;
    case Isa::kAvx2: run_avx2(body); return;
    default: run_default(body); return;
  }
}
#else
#define RLA_ISA_VARIANTS 0
template <typename Body>
inline void isa_dispatch(const Body& body) {
  body();
}
#endif

}  // namespace rla_ext::cpu
