// Which instruction-set variant of the hot loops runs (csrc/cpu/isa.h), and the ops that report and
// switch it: torch.ops.rla_ext.cpu_isa(), cpu_isa_supported(), set_cpu_isa(name).
#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace rla_ext::cpu {
namespace {

Isa detect() {
#if RLA_ISA_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

// $ATEN_CPU_CAPABILITY's names (ATen reads the same variable for its own kernels); other values
// (e.g. zvector, vsx on other machines) do not cap an x86 variant.
bool parse(const std::string& name, Isa* out) {
  if (name == "default") *out = Isa::kDefault;
  else if (name == "avx2") *out = Isa::kAvx2;
  else if (name == "avx512") *out = Isa::kAvx512;
  else return false;
  return true;
}

Isa initial() {
  Isa best = supported_isa(), cap;
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env != nullptr && parse(env, &cap) && cap < best) return cap;
  return best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial())};
  return slot;
}

std::string cpu_isa_op() { return isa_name(active_isa()); }
std::string cpu_isa_supported_op() { return isa_name(supported_isa()); }

std::string set_cpu_isa_op(std::string name) {
  Isa want;
  TORCH_CHECK(parse(name, &want), "set_cpu_isa: isa must be one of 'default', 'avx2', 'avx512', got '", name, "'");
  TORCH_CHECK(want <= supported_isa(), "set_cpu_isa: this CPU cannot run the '", name,
              "' variant (the best it runs is '", isa_name(supported_isa()), "')");
  const int previous = active_slot().exchange(static_cast<int>(want));
  return isa_name(static_cast<Isa>(previous));
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

Isa supported_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

TORCH_LIBRARY_IMPL(rla_ext, CompositeImplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa_op);
  m.impl("cpu_isa_supported", &cpu_isa_supported_op);
  m.impl("set_cpu_isa", &set_cpu_isa_op);
}

}  // namespace rla_ext::cpu
