// Op B on CPU: out = conv3x3(tanh(bn(pool?(h) + W_out @ y))). The pooled h is added straight into
// the 1x1 conv's output s; BatchNorm + tanh is one fused pass (cpu/batchnorm.h);
// the k->k 3x3 conv is ATen's. Backward recomputes a = tanh(bn(s)) instead of saving it.
// Contract: docs/ARCHITECTURE.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/batchnorm.h"
#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/update_tail.h"

namespace rla_ext::cpu {
namespace {

constexpr const char* kOp = "rla_update";

void check_inputs(const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight, const at::Tensor& gamma,
                  const at::Tensor& beta, const at::Tensor& rec_weight, bool pool) {
  check_activation(kOp, "y", y, y, "y");
  check_activation(kOp, "h", h, y, "y");
  const int64_t k = h.size(1);
  const int64_t hh = pool ? h.size(2) / 2 : h.size(2), hw = pool ? h.size(3) / 2 : h.size(3);
  TORCH_CHECK(h.size(0) == y.size(0) && hh == y.size(2) && hw == y.size(3), kOp, ": h ", h.sizes(),
              " does not match y ", y.sizes(), pool ? " (with pool, h's H, W halved (floor) must equal y's)"
                                                    : " (N, H, W must be equal)");
  check_weight(kOp, "out_weight", out_weight, {k, y.size(1)}, y, "y");
  check_weight(kOp, "rec_weight", rec_weight, {k, k, 3, 3}, y, "y");
  const auto sd = stat_dtype(y.scalar_type());
  check_stat(kOp, "gamma", gamma, k, sd);
  check_stat(kOp, "beta", beta, k, sd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& h_in, const at::Tensor& y_in, const at::Tensor& out_weight, const at::Tensor& gamma,
    const at::Tensor& beta, const c10::optional<at::Tensor>& mean_in, const c10::optional<at::Tensor>& var_in,
    const at::Tensor& rec_weight, bool pool, double eps) {
  check_inputs(h_in, y_in, out_weight, gamma, beta, rec_weight, pool);
  const auto fmt = memory_format_of(y_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor h = h_in.contiguous(fmt), y = y_in.contiguous(fmt), w = out_weight.contiguous();
  const int64_t k = h.size(1);
  at::Tensor s = conv1x1_new(y, w, fmt);
  add_state(s, h, pool, cl);

  StatInputs st = stat_inputs(kOp, mean_in, var_in, k, stat_dtype(y.scalar_type()));
  at::Tensor out = update_tail_forward(s, st, rec_weight, gamma, beta, eps, fmt);
  return {out, s, st.mean, st.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& h_in, const at::Tensor& y_in, const at::Tensor& out_weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& s_in,
    const at::Tensor& mean, const at::Tensor& var, bool pool, double eps, bool training) {
  check_inputs(h_in, y_in, out_weight, gamma, beta, rec_weight, pool);
  const int64_t k = h_in.size(1);
  const std::vector<int64_t> sshape{y_in.size(0), k, y_in.size(2), y_in.size(3)};
  check_backward_inputs(kOp, "s", s_in, grad_out, mean, var, sshape, y_in, "y");

  const auto fmt = memory_format_of(y_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor y = y_in.contiguous(fmt), w = out_weight.contiguous();
  const at::Tensor s = s_in.contiguous(fmt), go = grad_out.contiguous(fmt);
  auto [ds, drec, dgamma, dbeta] =
      update_tail_backward(go, s, rec_weight, mean, var, gamma, beta, eps, training, fmt);

  at::Tensor dy = conv1x1_input_grad(ds, w, y, fmt);
  at::Tensor dw = conv1x1_weight_grad_new(ds, y, w, cl);
  at::Tensor dh = state_grad(ds, h_in, pool, fmt);
  return {dh, dy, dw, drec, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("rla_update_kernel_fwd", &forward);
  m.impl("rla_update_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
