// The fused ops' autograd in C++: the eager fast path of rla_ext/ops/ (see _kernels.plain_eager).
//
// Why it exists: at RLA-ResNet's small stages a fused call's Python autograd.Function, its custom-op
// bodies, the running-statistics update and an autograd fallback on the kernel ops cost ~100 us of
// host time per forward+backward on a CPU, more than the whole chain of eager ops it replaces. Here
// the same kernels run under a C++ torch::autograd::Function: the forward calls the kernel op below
// autograd, saves what the Python Function saves, and the backward node calls the backward kernel
// without returning to Python; the BatchNorm bookkeeping around the forward kernel (eval statistics,
// running-statistics update) is done here too, as rla_ext/ops/_batchnorm.py does it (the Python path
// keeps that one for every other caller; tests/ops/test_cpp_autograd.py holds the two bitwise equal).
//
// Device-generic: the kernel ops are called through the dispatcher, which picks the CPU or CUDA kernel.
// Argument validation, formats and affine defaults stay in Python. These ops are only called in plain
// eager execution; tracing (torch.compile, fake tensors, dispatch modes) takes the Python path with the
// custom ops and their fake kernels.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/common.h"

namespace rla_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Fwd4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Fwd8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads9 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using CT = const Tensor&;
using COT = const OptTensor&;

template <class Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The kernels see exactly the dtypes they are given, as on the Python path (which turns autocast off
// around them): an enclosing autocast would otherwise recast the ATen GEMMs inside a CPU kernel.
// Below autograd as well, unless a backward is itself being recorded (create_graph): the kernel ops
// have no autograd of their own, and their not-implemented fallback costs ~15 us per call even with
// grad mode off. (Inside forward grad mode is always off.)
struct KernelGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  KernelGuard() {
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
  }
};

// grad_out as the backward kernels take it: the activations' dtype and memory format (autograd may
// hand another), as rla_ext/ops' _bwd_body does.
Tensor grad_like(const Tensor& grad, const Tensor& like) {
  return grad.to(like.scalar_type()).contiguous(cpu::memory_format_of(like));
}

// The block entries act(bn(conv(cat(x, h)))): stride 0 is the bottleneck's 1x1 entry
// (concat_conv_bn_act), else the basic block's 3x3 entry with that stride (concat_conv3x3_bn_act).
// Returns (out, mean, var): the batch statistics (training) or the given ones (eval), non-differentiable.
// mean / var given (eval) or not (training) as the kernels take them.
struct EntryFunction : public torch::autograd::Function<EntryFunction> {
  static variable_list forward(AutogradContext* ctx, CT x, CT h, CT weight, CT gamma, CT beta, COT mean, COT var,
                               int64_t stride, double eps, bool relu) {
    static const auto fwd1 = kernel_op<Fwd4(CT, CT, CT, CT, CT, COT, COT, double, bool)>(
        "rla_ext::concat_conv_bn_act_kernel_fwd");
    static const auto fwd3 = kernel_op<Fwd4(CT, CT, CT, CT, CT, COT, COT, int64_t, double, bool)>(
        "rla_ext::concat_conv3x3_bn_act_kernel_fwd");
    KernelGuard guard;
    auto [out, z, m, v] = stride == 0 ? fwd1.call(x, h, weight, gamma, beta, mean, var, eps, relu)
                                      : fwd3.call(x, h, weight, gamma, beta, mean, var, stride, eps, relu);
    ctx->save_for_backward({x, h, weight, gamma, beta, z, m, v});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["training"] = !mean.has_value();
    ctx->mark_non_differentiable({m, v});
    // Only out's gradient is used: no zero tensors filled in for the statistics' gradients.
    ctx->set_materialize_grads(false);
    return {out, m, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd1 = kernel_op<Grads5(CT, CT, CT, CT, CT, CT, CT, CT, CT, double, bool, bool)>(
        "rla_ext::concat_conv_bn_act_kernel_bwd");
    static const auto bwd3 = kernel_op<Grads5(CT, CT, CT, CT, CT, CT, CT, CT, CT, int64_t, double, bool, bool)>(
        "rla_ext::concat_conv3x3_bn_act_kernel_bwd");
    if (!grads[0].defined()) return variable_list(10);
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h = saved[1], &w = saved[2], &gamma = saved[3], &beta = saved[4], &z = saved[5],
                 &m = saved[6], &v = saved[7];
    const int64_t stride = ctx->saved_data["stride"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool relu = ctx->saved_data["relu"].toBool(), training = ctx->saved_data["training"].toBool();
    const Tensor go = grad_like(grads[0], x);
    KernelGuard guard;
    auto [dx, dh, dw, dgamma, dbeta] =
        stride == 0 ? bwd1.call(go, x, h, w, gamma, beta, z, m, v, eps, relu, training)
                    : bwd3.call(go, x, h, w, gamma, beta, z, m, v, stride, eps, relu, training);
    return {dx, dh, dw, dgamma, dbeta, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// rla_update: rec3x3(tanh(bn(pool?(h) + out1x1(y)))). (out, mean, var) as EntryFunction.
struct UpdateFunction : public torch::autograd::Function<UpdateFunction> {
  static variable_list forward(AutogradContext* ctx, CT h, CT y, CT out_weight, CT gamma, CT beta, COT mean,
                               COT var, CT rec_weight, bool pool, double eps) {
    static const auto fwd = kernel_op<Fwd4(CT, CT, CT, CT, CT, COT, COT, CT, bool, double)>(
        "rla_ext::rla_update_kernel_fwd");
    KernelGuard guard;
    auto [out, s, m, v] = fwd.call(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool, eps);
    ctx->save_for_backward({h, y, out_weight, gamma, beta, rec_weight, s, m, v});
    ctx->saved_data["pool"] = pool;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = !mean.has_value();
    ctx->mark_non_differentiable({m, v});
    ctx->set_materialize_grads(false);
    return {out, m, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = kernel_op<Grads6(CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, bool, double, bool)>(
        "rla_ext::rla_update_kernel_bwd");
    if (!grads[0].defined()) return variable_list(10);
    const auto saved = ctx->get_saved_variables();
    const Tensor &h = saved[0], &y = saved[1], &w_out = saved[2], &gamma = saved[3], &beta = saved[4],
                 &w_rec = saved[5], &s = saved[6], &m = saved[7], &v = saved[8];
    const bool pool = ctx->saved_data["pool"].toBool(), training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor go = grad_like(grads[0], y);
    KernelGuard guard;
    auto [dh, dy, dw_out, dw_rec, dgamma, dbeta] =
        bwd.call(go, h, y, w_out, gamma, beta, w_rec, s, m, v, pool, eps, training);
    return {dh, dy, dw_out, dgamma, dbeta, Tensor(), Tensor(), dw_rec, Tensor(), Tensor()};
  }
};

// rla_update_and_entry, the block boundary: (h_next, out, mean, var, entry_mean, entry_var), the statistics
// non-differentiable; s and z are saved, not returned (the Python Function returns them as outputs, for
// which autograd then materialises zero gradients).
struct BoundaryFunction : public torch::autograd::Function<BoundaryFunction> {
  static variable_list forward(AutogradContext* ctx, CT h, CT y, CT out_weight, CT gamma, CT beta, COT mean,
                               COT var, CT rec_weight, CT entry_weight, CT entry_gamma, CT entry_beta,
                               COT entry_mean, COT entry_var, bool pool, double eps, double entry_eps, bool relu) {
    static const auto fwd =
        kernel_op<Fwd8(CT, CT, CT, CT, CT, COT, COT, CT, CT, CT, CT, COT, COT, bool, double, double, bool)>(
            "rla_ext::rla_update_and_entry_kernel_fwd");
    KernelGuard guard;
    auto [h_next, s, m, v, out, z, em, ev] = fwd.call(h, y, out_weight, gamma, beta, mean, var, rec_weight,
                                                      entry_weight, entry_gamma, entry_beta, entry_mean, entry_var,
                                                      pool, eps, entry_eps, relu);
    ctx->save_for_backward({h, y, out_weight, gamma, beta, rec_weight, s, m, v, h_next, entry_weight, entry_gamma,
                            entry_beta, z, em, ev});
    ctx->saved_data["pool"] = pool;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["entry_eps"] = entry_eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["training"] = !mean.has_value();
    ctx->mark_non_differentiable({m, v, em, ev});
    ctx->set_materialize_grads(false);
    return {h_next, out, m, v, em, ev};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = kernel_op<Grads9(CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT,
                                             bool, double, double, bool, bool)>("rla_ext::rla_update_and_entry_kernel_bwd");
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(17);
    const auto saved = ctx->get_saved_variables();
    const Tensor &h = saved[0], &y = saved[1], &w_out = saved[2], &gamma = saved[3], &beta = saved[4],
                 &w_rec = saved[5], &s = saved[6], &m = saved[7], &v = saved[8], &h_next = saved[9],
                 &w_e = saved[10], &gamma_e = saved[11], &beta_e = saved[12], &z = saved[13], &em = saved[14],
                 &ev = saved[15];
    const bool pool = ctx->saved_data["pool"].toBool(), relu = ctx->saved_data["relu"].toBool();
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble(), entry_eps = ctx->saved_data["entry_eps"].toDouble();
    // An output outside the loss sends zeros, as autograd would have materialised them.
    const Tensor g_next = grads[0].defined() ? grad_like(grads[0], y) : at::zeros_like(s);
    const Tensor g_out = grads[1].defined() ? grad_like(grads[1], y) : at::zeros_like(z);
    KernelGuard guard;
    auto [dh, dy, dw_out, dw_rec, dgamma, dbeta, dw_e, dgamma_e, dbeta_e] =
        bwd.call(g_next, g_out, h, y, w_out, gamma, beta, w_rec, s, m, v, h_next, w_e, gamma_e, beta_e, z, em, ev,
                 pool, eps, entry_eps, relu, training);
    return {dh,       dy,       dw_out,   dgamma,   dbeta,    Tensor(), Tensor(), dw_rec,  dw_e,
            dgamma_e, dbeta_e,  Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------- BatchNorm bookkeeping
// Mirrors rla_ext/ops/_batchnorm.py (eval_stats, update_running_stats) and _kernels.forward_with_stats.

// Eval: the kernels normalise with fresh copies of the running statistics in the stat dtype (they are
// saved for backward, so later in-place updates of the buffers cannot reach them). Training: none.
std::pair<OptTensor, OptTensor> kernel_stats(COT running_mean, COT running_var, bool training, const Tensor& like) {
  if (training) return {std::nullopt, std::nullopt};
  TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
              "rla_ext: eval mode needs running_mean and running_var");
  const auto sd = cpu::stat_dtype(like.scalar_type());
  return {running_mean->to(sd, false, true).contiguous(), running_var->to(sd, false, true).contiguous()};
}

// running <- (1 - momentum) * running + momentum * batch, with the unbiased batch variance over `count`
// values per channel (N * H * W of out). Same operations in the same order as the Python update.
void update_running_stats(COT running_mean, COT running_var, const Tensor& mean, const Tensor& var,
                          const Tensor& out, double momentum) {
  if (!running_mean.has_value() || !running_var.has_value()) return;
  const int64_t count = out.numel() / out.size(1);
  at::NoGradGuard no_grad;
  Tensor rm = *running_mean, rv = *running_var;
  rm.lerp_(mean.scalar_type() == rm.scalar_type() ? mean : mean.to(rm.scalar_type()), momentum);
  rv.mul_(1.0 - momentum)
      .add_(var.scalar_type() == rv.scalar_type() ? var : var.to(rv.scalar_type()),
            momentum * static_cast<double>(count) / static_cast<double>(count - 1));
}

// One training or eval call of a Function whose apply(mean, var) returns (out, mean, var).
template <class Apply>
Tensor with_running_stats(COT running_mean, COT running_var, bool training, double momentum, const Tensor& like,
                          const Apply& apply) {
  auto [m, v] = kernel_stats(running_mean, running_var, training, like);
  const variable_list r = apply(m, v);
  if (training) update_running_stats(running_mean, running_var, r[1], r[2], r[0], momentum);
  return r[0];
}

// ---------------------------------------------------------------- the ops
Tensor concat_conv_bn_act(CT x, CT h, CT weight, CT gamma, CT beta, COT running_mean, COT running_var,
                          bool training, double momentum, double eps, bool relu) {
  return with_running_stats(running_mean, running_var, training, momentum, x, [&](COT m, COT v) {
    return EntryFunction::apply(x, h, weight, gamma, beta, m, v, int64_t{0}, eps, relu);
  });
}

Tensor concat_conv3x3_bn_act(CT x, CT h, CT weight, CT gamma, CT beta, COT running_mean, COT running_var,
                             bool training, double momentum, int64_t stride, double eps, bool relu) {
  TORCH_CHECK(stride > 0, "concat_conv3x3_bn_act_autograd: stride must be positive, got ", stride);
  return with_running_stats(running_mean, running_var, training, momentum, x, [&](COT m, COT v) {
    return EntryFunction::apply(x, h, weight, gamma, beta, m, v, stride, eps, relu);
  });
}

Tensor rla_update(CT h, CT y, CT out_weight, CT gamma, CT beta, COT running_mean, COT running_var, CT rec_weight,
                  bool pool, bool training, double momentum, double eps) {
  return with_running_stats(running_mean, running_var, training, momentum, y, [&](COT m, COT v) {
    return UpdateFunction::apply(h, y, out_weight, gamma, beta, m, v, rec_weight, pool, eps);
  });
}

// The boundary: both BatchNorms' bookkeeping around one kernel call, as the Python path's _fwd_body.
std::tuple<Tensor, Tensor> rla_update_and_entry(CT h, CT y, CT out_weight, CT gamma, CT beta, COT running_mean,
                                                COT running_var, CT rec_weight, CT entry_weight, CT entry_gamma,
                                                CT entry_beta, COT entry_running_mean, COT entry_running_var,
                                                bool pool, bool training, double momentum, double eps,
                                                double entry_momentum, double entry_eps, bool relu) {
  auto [m, v] = kernel_stats(running_mean, running_var, training, y);
  auto [em, ev] = kernel_stats(entry_running_mean, entry_running_var, training, y);
  const variable_list r = BoundaryFunction::apply(h, y, out_weight, gamma, beta, m, v, rec_weight, entry_weight,
                                                  entry_gamma, entry_beta, em, ev, pool, eps, entry_eps, relu);
  if (training) {
    update_running_stats(running_mean, running_var, r[2], r[3], r[0], momentum);
    update_running_stats(entry_running_mean, entry_running_var, r[4], r[5], r[1], entry_momentum);
  }
  return {r[0], r[1]};
}

}  // namespace

// Autograd: the Functions above. CompositeExplicitAutograd: the same call where autograd is not in the
// dispatch key set (inference_mode tensors), where Function::apply simply records nothing.
TORCH_LIBRARY_IMPL(rla_ext, Autograd, m) {
  m.impl("concat_conv_bn_act_autograd", &concat_conv_bn_act);
  m.impl("concat_conv3x3_bn_act_autograd", &concat_conv3x3_bn_act);
  m.impl("rla_update_autograd", &rla_update);
  m.impl("rla_update_and_entry_autograd", &rla_update_and_entry);
}

TORCH_LIBRARY_IMPL(rla_ext, CompositeExplicitAutograd, m) {
  m.impl("concat_conv_bn_act_autograd", &concat_conv_bn_act);
  m.impl("concat_conv3x3_bn_act_autograd", &concat_conv3x3_bn_act);
  m.impl("rla_update_autograd", &rla_update);
  m.impl("rla_update_and_entry_autograd", &rla_update_and_entry);
}

}  // namespace rla_ext
