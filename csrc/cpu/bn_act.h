// BatchNorm + activation over a whole activation tensor, forward and backward: the tensor-level
// wrappers of batchnorm.h's fused passes, shared by every kernel whose output is act(bn(z)).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cpu/batchnorm.h"
#include "cpu/common.h"

namespace rla_ext::cpu {

// Runs `body` with Act = ActRelu or ActIdentity.
template <typename F>
void with_act(bool relu, const F& body) {
  if (relu) body(ActRelu{});
  else body(ActIdentity{});
}

// Act(bn(z)) in z's layout `fmt`; in training the batch statistics are computed into st first.
template <typename Act>
at::Tensor bn_act_forward_with(const at::Tensor& z, StatInputs& st, const at::Tensor& gamma, const at::Tensor& beta,
                               double eps, at::MemoryFormat fmt) {
  const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
  at::Tensor out = at::empty_like(z);
  const ChannelLayout L = layout_of(z, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (st.training) batch_stats(z.const_data_ptr<scalar_t>(), L, st.mean.data_ptr<acc_t>(), st.var.data_ptr<acc_t>());
    normalize_act<Act>(z.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), L, st.mean.const_data_ptr<acc_t>(),
                       st.var.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps);
  });
  return out;
}

// relu(bn(z)) or bn(z).
inline at::Tensor bn_act_forward(const at::Tensor& z, StatInputs& st, const at::Tensor& gamma, const at::Tensor& beta,
                                 double eps, bool relu, at::MemoryFormat fmt) {
  at::Tensor out;
  with_act(relu, [&](auto act) { out = bn_act_forward_with<decltype(act)>(z, st, gamma, beta, eps, fmt); });
  return out;
}

struct BnActGrads {
  at::Tensor dz;      // like z
  at::Tensor dgamma;  // (C,)
  at::Tensor dbeta;   // (C,)
};

// The gradient through act(bn(z)) given the gradient of its output; mean/var: the statistics the
// forward normalised with (batch statistics in training, the running ones in eval).
inline BnActGrads bn_act_backward_pass(const at::Tensor& go, const at::Tensor& z, const at::Tensor& mean,
                                       const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                                       double eps, bool relu, bool training, at::MemoryFormat fmt) {
  const at::Tensor m = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const int64_t C = z.size(1);
  BnActGrads out{at::empty_like(z), at::empty({C}, g.options()), at::empty({C}, g.options())};
  const ChannelLayout L = layout_of(z, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_act(relu, [&](auto act) {
      bn_act_backward<decltype(act)>(go.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                     out.dz.data_ptr<scalar_t>(), L, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
                                     g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps, training,
                                     out.dgamma.data_ptr<acc_t>(), out.dbeta.data_ptr<acc_t>());
    });
  });
  return out;
}

}  // namespace rla_ext::cpu
