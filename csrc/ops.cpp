// The kernel op schemas of rla_ext (one place). CPU kernels register in csrc/cpu/, CUDA kernels in
// csrc/cuda/; the dispatcher picks by device. The Python layer (rla_ext/ops/) validates arguments,
// keeps the BatchNorm bookkeeping and wraps these in autograd; see docs/ARCHITECTURE.md for the contract.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rla_ext, m) {
  m.def("concat_conv_bn_act_kernel_fwd(Tensor x, Tensor h, Tensor weight, Tensor gamma, Tensor beta, "
        "Tensor? mean, Tensor? var, float eps, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("concat_conv_bn_act_kernel_bwd(Tensor grad_out, Tensor x, Tensor h, Tensor weight, Tensor gamma, "
        "Tensor beta, Tensor z, Tensor mean, Tensor var, float eps, bool relu, bool training) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The basic-block entry: act(bn(conv3x3(cat(x, h), weight, stride, padding 1))), weight (C_out, C + k, 3, 3).
  m.def("concat_conv3x3_bn_act_kernel_fwd(Tensor x, Tensor h, Tensor weight, Tensor gamma, Tensor beta, "
        "Tensor? mean, Tensor? var, int stride, float eps, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("concat_conv3x3_bn_act_kernel_bwd(Tensor grad_out, Tensor x, Tensor h, Tensor weight, Tensor gamma, "
        "Tensor beta, Tensor z, Tensor mean, Tensor var, int stride, float eps, bool relu, bool training) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rla_update_kernel_fwd(Tensor h, Tensor y, Tensor out_weight, Tensor gamma, Tensor beta, "
        "Tensor? mean, Tensor? var, Tensor rec_weight, bool pool, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rla_update_kernel_bwd(Tensor grad_out, Tensor h, Tensor y, Tensor out_weight, Tensor gamma, "
        "Tensor beta, Tensor rec_weight, Tensor s, Tensor mean, Tensor var, bool pool, float eps, bool training) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The block boundary (rla_ext/ops/rla_update_and_entry.py): rla_update then concat_conv_bn_act(y, h_next)
  // with y read once; CPU only so far. Forward -> (h_next, s, mean, var, out, z, entry_mean, entry_var).
  m.def("rla_update_and_entry_kernel_fwd(Tensor h, Tensor y, Tensor out_weight, Tensor gamma, Tensor beta, "
        "Tensor? mean, Tensor? var, Tensor rec_weight, Tensor entry_weight, Tensor entry_gamma, Tensor entry_beta, "
        "Tensor? entry_mean, Tensor? entry_var, bool pool, float eps, float entry_eps, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rla_update_and_entry_kernel_bwd(Tensor grad_h_next, Tensor grad_out, Tensor h, Tensor y, "
        "Tensor out_weight, Tensor gamma, Tensor beta, Tensor rec_weight, Tensor s, Tensor mean, Tensor var, "
        "Tensor h_next, Tensor entry_weight, Tensor entry_gamma, Tensor entry_beta, Tensor z, Tensor entry_mean, "
        "Tensor entry_var, bool pool, float eps, float entry_eps, bool relu, bool training) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The eager fast path (csrc/autograd.cpp): the kernels above under a C++ autograd Function, with the
  // BatchNorm bookkeeping (running statistics updated in place when training), for plain eager calls
  // only (no fake kernels: tracing takes the Python custom ops). -> out (the boundary: h_next, out).
  m.def("concat_conv_bn_act_autograd(Tensor x, Tensor h, Tensor weight, Tensor gamma, Tensor beta, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) "
        "-> Tensor");
  m.def("concat_conv3x3_bn_act_autograd(Tensor x, Tensor h, Tensor weight, Tensor gamma, Tensor beta, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, int stride, float eps, "
        "bool relu) -> Tensor");
  m.def("rla_update_autograd(Tensor h, Tensor y, Tensor out_weight, Tensor gamma, Tensor beta, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor rec_weight, bool pool, bool training, "
        "float momentum, float eps) -> Tensor");
  m.def("rla_update_and_entry_autograd(Tensor h, Tensor y, Tensor out_weight, Tensor gamma, Tensor beta, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor rec_weight, Tensor entry_weight, "
        "Tensor entry_gamma, Tensor entry_beta, Tensor(c!)? entry_running_mean, Tensor(d!)? entry_running_var, "
        "bool pool, bool training, float momentum, float eps, float entry_momentum, float entry_eps, bool relu) "
        "-> (Tensor, Tensor)");
  // The ConvGRU / ConvLSTM aggregation cells (rla_ext/ops/conv_gru_cell.py, conv_lstm_cell.py); CPU only,
  // other devices run the reference. GRU stats: (N, 3, 2) per-sample (mean, rstd) of the r, u, output norms.
  m.def("conv_gru_cell_kernel_fwd(Tensor x, Tensor h, Tensor gate_weight, Tensor gate_bias, Tensor output_weight, "
        "Tensor output_bias, Tensor gamma, Tensor beta, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_gru_cell_kernel_bwd(Tensor grad_out, Tensor x, Tensor h, Tensor gate_weight, Tensor output_weight, "
        "Tensor gamma, Tensor beta, Tensor zg, Tensor zo, Tensor stats) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_lstm_cell_kernel_fwd(Tensor x, Tensor h, Tensor c, Tensor weight, Tensor bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv_lstm_cell_kernel_bwd(Tensor grad_h, Tensor grad_c, Tensor x, Tensor h, Tensor c, Tensor weight, "
        "Tensor z, Tensor c_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The instruction-set variant of the CPU kernels' hot loops (csrc/cpu/isa.h): the one in use, the
  // best this CPU runs, and a switch for tests (returns the previous one).
  m.def("cpu_isa() -> str");
  m.def("cpu_isa_supported() -> str");
  m.def("set_cpu_isa(str isa) -> str");
}

// `import rla_ext._C` only has to load this library so the registrations above run; the module
// itself is empty (no pybind11, which keeps compile time down).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "rla_ext kernels (registered as torch.ops.rla_ext.*)",
                                   -1, nullptr};
  return PyModule_Create(&def);
}
