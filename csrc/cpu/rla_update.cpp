// Op B on CPU: out = conv3x3(tanh(bn(pool?(h) + W_out @ y))). The pooled h is added straight into
// the 1x1 conv's output s; BatchNorm + tanh is one fused pass (cpu/batchnorm.h);
// the k->k 3x3 conv is ATen's. Backward recomputes a = tanh(bn(s)) instead of saving it.
// Contract: docs/ARCHITECTURE.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cpu/batchnorm.h"
#include "cpu/common.h"
#include "cpu/isa.h"

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
  const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
  at::Tensor a = at::empty_like(s);
  const ChannelLayout L = layout_of(s, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "rla_update_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (st.training) batch_stats(s.const_data_ptr<scalar_t>(), L, st.mean.data_ptr<acc_t>(), st.var.data_ptr<acc_t>());
    normalize_act<ActTanh>(s.const_data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), L, st.mean.const_data_ptr<acc_t>(),
                           st.var.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps);
  });
  at::Tensor out = at::conv2d(a, rec_weight.contiguous(), {}, 1, 1).contiguous(fmt);
  return {out, s, st.mean, st.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& h_in, const at::Tensor& y_in, const at::Tensor& out_weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& s_in,
    const at::Tensor& mean, const at::Tensor& var, bool pool, double eps, bool training) {
  check_inputs(h_in, y_in, out_weight, gamma, beta, rec_weight, pool);
  const int64_t k = h_in.size(1);
  const std::vector<int64_t> sshape{y_in.size(0), k, y_in.size(2), y_in.size(3)};
  check_activation(kOp, "s", s_in, y_in, "y");
  TORCH_CHECK(s_in.sizes() == at::IntArrayRef(sshape), kOp, ": s must have shape ", sshape, ", got ", s_in.sizes());
  check_activation(kOp, "grad_out", grad_out, y_in, "y");
  TORCH_CHECK(grad_out.sizes() == s_in.sizes(), kOp, ": grad_out must have shape ", s_in.sizes(), ", got ",
              grad_out.sizes());
  const auto sd = stat_dtype(y_in.scalar_type());
  check_stat(kOp, "mean", mean, k, sd);
  check_stat(kOp, "var", var, k, sd);

  const auto fmt = memory_format_of(y_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor y = y_in.contiguous(fmt), w = out_weight.contiguous(), wr = rec_weight.contiguous();
  const at::Tensor s = s_in.contiguous(fmt), go = grad_out.contiguous(fmt);
  const at::Tensor m = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const ChannelLayout L = layout_of(s, fmt);

  at::Tensor a = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "rla_update_recompute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_act<ActTanh>(s.const_data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), L, m.const_data_ptr<acc_t>(),
                           v.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps);
  });
  auto conv_grads = at::convolution_backward(go, a, wr, c10::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                             {true, true, false});
  at::Tensor da = std::get<0>(conv_grads).contiguous(fmt);
  at::Tensor drec = std::get<1>(conv_grads).contiguous();

  at::Tensor ds = at::empty_like(s);
  at::Tensor dgamma = at::empty({k}, g.options()), dbeta = at::empty({k}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "rla_update_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto act) {
      bn_act_backward<decltype(act)>(da.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                     ds.data_ptr<scalar_t>(), L, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
                                     g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps, training,
                                     dgamma.data_ptr<acc_t>(), dbeta.data_ptr<acc_t>());
    };
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // a is as exact as the accumulator here, so tanh' = 1 - a^2 comes from it in one cheap pass
      // instead of two more tanh evaluations. Half types recompute tanh in float: 1 - a^2 from a
      // rounded to 8-11 bits loses most of its digits where |a| is near 1.
      scalar_t* gd = da.data_ptr<scalar_t>();
      const scalar_t* av = a.const_data_ptr<scalar_t>();
      for_each_element(L, [=](int64_t i, int64_t) { gd[i] = gd[i] * (scalar_t(1) - av[i] * av[i]); });
      run(ActIdentity{});
    } else {
      run(ActTanh{});
    }
  });

  at::Tensor dy = conv1x1_input_grad(ds, w, fmt);
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
