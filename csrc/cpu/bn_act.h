// What the block-entry kernels share once their convolutions have produced the pre-BN tensor z:
// op A (concat_conv_bn_act.cpp, 1x1 GEMMs) and the basic-block 3x3 entry (concat_conv3x3_bn_act.cpp,
// two ATen convolutions). Forward: batch statistics (training) and the fused normalise + activation
// pass; backward: the fused activation + BatchNorm backward (one reduction, one elementwise pass).
// The loops themselves are the shared ones of cpu/batchnorm.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "cpu/batchnorm.h"
#include "cpu/common.h"

namespace rla_ext::cpu {

// Runs `body` with Act = ActRelu or ActIdentity.
template <typename F>
void with_act(bool relu, const F& body) {
  if (relu) body(ActRelu{});
  else body(ActIdentity{});
}

// (out, mean, var) of out = act(bn(z)), z in format `fmt`: the batch mean and biased variance of z
// when mean_in / var_in are None (training), else checked copies of the given ones (eval).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_pass(
    const char* op, const at::Tensor& z, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, const at::Tensor& gamma, const at::Tensor& beta, double eps, bool relu,
    at::MemoryFormat fmt) {
  TORCH_CHECK(z.is_contiguous(fmt), op, ": z must be dense in the activations' memory format");
  StatInputs st = stat_inputs(op, mean_in, var_in, z.size(1), stat_dtype(z.scalar_type()));
  const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
  at::Tensor out = at::empty_like(z);
  const ChannelLayout L = layout_of(z, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_pass", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (st.training) batch_stats(z.const_data_ptr<scalar_t>(), L, st.mean.data_ptr<acc_t>(), st.var.data_ptr<acc_t>());
    with_act(relu, [&](auto act) {
      normalize_act<decltype(act)>(z.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), L,
                                   st.mean.const_data_ptr<acc_t>(), st.var.const_data_ptr<acc_t>(),
                                   g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps);
    });
  });
  return {out, st.mean, st.var};
}

// (dz, dgamma, dbeta) of out = act(bn(z)) given grad_out; z and grad_out in format `fmt`, the
// statistics in the stat dtype. Training includes the batch-statistics terms.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_pass(
    const char* op, const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& gamma, const at::Tensor& beta, double eps, bool relu, bool training, at::MemoryFormat fmt) {
  const at::Tensor go = grad_out.contiguous(fmt);
  const at::Tensor m = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const int64_t Co = z.size(1);
  at::Tensor dz = at::empty_like(z);
  at::Tensor dgamma = at::empty({Co}, g.options()), dbeta = at::empty({Co}, g.options());
  const ChannelLayout L = layout_of(z, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_pass", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_act(relu, [&](auto act) {
      bn_act_backward<decltype(act)>(go.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                     dz.data_ptr<scalar_t>(), L, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
                                     g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps, training,
                                     dgamma.data_ptr<acc_t>(), dbeta.data_ptr<acc_t>());
    });
  });
  return {dz, dgamma, dbeta};
}

}  // namespace rla_ext::cpu
