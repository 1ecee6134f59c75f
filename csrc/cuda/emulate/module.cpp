// Python module of the emulated CUDA kernels: the host functions of ../ops.h on CPU tensors, and the
// emulator's knobs. Built by tests/cuda_emulation.py (torch.utils.cpp_extension.load).
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "../ops.h"
#include "runtime.h"

namespace emu = rla_ext::emulate;

namespace rla_ext::cuda::selftest {
at::Tensor run(const std::string& name);  // selftest.cpp
}

namespace {

emu::Schedule parse_schedule(const std::string& name) {
  if (name == "inorder") return emu::Schedule::kInOrder;
  if (name == "shuffled") return emu::Schedule::kShuffled;
  if (name == "threaded") return emu::Schedule::kThreaded;
  throw std::invalid_argument("schedule: expected 'inorder', 'shuffled' or 'threaded', got '" + name + "'");
}

const char* schedule_name(emu::Schedule s) {
  switch (s) {
    case emu::Schedule::kInOrder:
      return "inorder";
    case emu::Schedule::kShuffled:
      return "shuffled";
    case emu::Schedule::kThreaded:
      return "threaded";
  }
  return "?";
}

bool sanitized() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rla_ext CUDA kernels (csrc/cuda/) under the CPU emulator, on CPU tensors";
  m.def("concat_conv_bn_act_fwd", &rla_ext::cuda::concat_conv_bn_act_fwd_cuda);
  m.def("concat_conv_bn_act_bwd", &rla_ext::cuda::concat_conv_bn_act_bwd_cuda);
  m.def("concat_conv3x3_bn_act_fwd", &rla_ext::cuda::concat_conv3x3_bn_act_fwd_cuda);
  m.def("concat_conv3x3_bn_act_bwd", &rla_ext::cuda::concat_conv3x3_bn_act_bwd_cuda);
  m.def("rla_update_fwd", &rla_ext::cuda::rla_update_fwd_cuda);
  m.def("rla_update_bwd", &rla_ext::cuda::rla_update_bwd_cuda);
  m.def("rla_update_and_entry_fwd", &rla_ext::cuda::rla_update_and_entry_fwd_cuda);
  m.def("rla_update_and_entry_bwd", &rla_ext::cuda::rla_update_and_entry_bwd_cuda);
  m.def(
      "configure",
      [](const std::string& schedule, uint64_t seed, int multiprocessor_count) {
        if (multiprocessor_count < 1) throw std::invalid_argument("multiprocessor_count: expected >= 1");
        emu::Settings& s = emu::settings();
        s.schedule = parse_schedule(schedule);
        s.seed = seed;
        s.multiprocessor_count = multiprocessor_count;
      },
      "Thread schedule ('inorder', 'shuffled', 'threaded'), its seed, and the emulated SM count.",
      pybind11::arg("schedule") = "inorder", pybind11::arg("seed") = 0, pybind11::arg("multiprocessor_count") = 2);
  m.def("settings", [] {
    const emu::Settings& s = emu::settings();
    pybind11::dict d;
    d["schedule"] = schedule_name(s.schedule);
    d["seed"] = s.seed;
    d["multiprocessor_count"] = s.multiprocessor_count;
    return d;
  });
  m.def("launch_log", [] {
    pybind11::list out;
    for (const auto& r : emu::launch_log()) {
      pybind11::dict d;
      d["kernel"] = r.kernel;
      d["grid"] = pybind11::make_tuple(r.grid.x, r.grid.y, r.grid.z);
      d["block"] = pybind11::make_tuple(r.block.x, r.block.y, r.block.z);
      d["dynamic_smem"] = r.dynamic_smem;
      d["static_smem"] = r.static_smem;
      d["barriers"] = r.barriers;
      out.append(d);
    }
    return out;
  });
  m.def("selftest", &rla_ext::cuda::selftest::run, "Runs one deliberately broken kernel of selftest.cpp.");
  m.def("clear_launch_log", [] { emu::launch_log().clear(); });
  m.attr("sanitized") = sanitized();
}
