// Op A on CPU: act(bn(W @ cat(x, h))) without building cat(x, h). The 1x1 conv is two GEMMs that
// accumulate into z (x's columns of W, then h's); BatchNorm and the activation are the fused passes
// of cpu/bn_act.h (shared with the 3x3 entry). Contract: docs/ARCHITECTURE.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/batchnorm.h"
#include "cpu/bn_act.h"
#include "cpu/common.h"

namespace rla_ext::cpu {
namespace {

constexpr const char* kOp = "concat_conv_bn_act";

void check_inputs(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
                  const at::Tensor& beta) {
  check_entry_activations(kOp, x, h);
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be a 2-D (C_out, C + k) matrix, got shape ", weight.sizes());
  check_weight(kOp, "weight", weight, {weight.size(0), x.size(1) + h.size(1)}, x, "x");
  check_entry_affine(kOp, gamma, beta, weight.size(0), x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const c10::optional<at::Tensor>& mean_in, const c10::optional<at::Tensor>& var_in,
    double eps, bool relu) {
  check_inputs(x_in, h_in, weight, gamma, beta);
  const auto fmt = memory_format_of(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), w = weight.contiguous();
  const int64_t C = x.size(1), k = h.size(1);
  at::Tensor z = conv1x1_new(x, w.narrow(1, 0, C), fmt);
  conv1x1(z, w.narrow(1, C, k), h, cl, true);

  StatInputs st = stat_inputs(kOp, mean_in, var_in, z.size(1), stat_dtype(x.scalar_type()));
  at::Tensor out = bn_act_forward(z, st, gamma, beta, eps, relu, fmt);
  return {out, z, st.mean, st.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& z_in, const at::Tensor& mean,
    const at::Tensor& var, double eps, bool relu, bool training) {
  check_inputs(x_in, h_in, weight, gamma, beta);
  const int64_t C = x_in.size(1), k = h_in.size(1), Co = weight.size(0);
  const std::vector<int64_t> zshape{x_in.size(0), Co, x_in.size(2), x_in.size(3)};
  check_backward_inputs(kOp, "z", z_in, grad_out, mean, var, zshape, x_in, "x");

  const auto fmt = memory_format_of(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), w = weight.contiguous();
  const at::Tensor z = z_in.contiguous(fmt), go = grad_out.contiguous(fmt);
  auto [dz, dgamma, dbeta] = bn_act_backward_pass(go, z, mean, var, gamma, beta, eps, relu, training, fmt);

  at::Tensor dx = conv1x1_input_grad(dz, w.narrow(1, 0, C), x, fmt);
  at::Tensor dh = conv1x1_input_grad(dz, w.narrow(1, C, k), h, fmt);
  at::Tensor dw = at::empty({Co, C + k}, w.options());
  conv1x1_weight_grad(dw.narrow(1, 0, C), dz, x, cl);
  conv1x1_weight_grad(dw.narrow(1, C, k), dz, h, cl);
  return {dx, dh, dw, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("concat_conv_bn_act_kernel_fwd", &forward);
  m.impl("concat_conv_bn_act_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
