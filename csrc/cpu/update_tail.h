// The tail of the RLA update, h' = conv3x3(tanh(bn(s))), forward and backward (back to s).
// Shared by rla_update's kernel and the block-boundary kernel (rla_update_and_entry).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "cpu/batchnorm.h"
#include "cpu/bn_act.h"
#include "cpu/common.h"

namespace rla_ext::cpu {

// h' from s; in training the batch statistics of s are computed into st first.
inline at::Tensor update_tail_forward(const at::Tensor& s, StatInputs& st, const at::Tensor& rec_weight,
                                      const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                      at::MemoryFormat fmt) {
  const at::Tensor a = bn_act_forward_with<ActTanh>(s, st, gamma, beta, eps, fmt);
  return at::conv2d(a, rec_weight.contiguous(), {}, 1, 1).contiguous(fmt);
}

struct UpdateTailGrads {
  at::Tensor ds;      // (N, k, H, W) in `fmt`
  at::Tensor drec;    // (k, k, 3, 3)
  at::Tensor dgamma;  // (k,)
  at::Tensor dbeta;   // (k,)
};

// go: the gradient of h'; s: the saved pre-BN sum; mean/var: the statistics the forward normalised
// with; a = tanh(bn(s)) is recomputed rather than saved (one pass over k channels).
inline UpdateTailGrads update_tail_backward(const at::Tensor& go, const at::Tensor& s, const at::Tensor& rec_weight,
                                            const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
                                            const at::Tensor& beta, double eps, bool training, at::MemoryFormat fmt) {
  const at::Tensor m = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const int64_t k = s.size(1);
  const ChannelLayout L = layout_of(s, fmt);
  at::Tensor a = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rla_update_recompute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_act<ActTanh>(s.const_data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), L, m.const_data_ptr<acc_t>(),
                           v.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps);
  });
  auto conv_grads = at::convolution_backward(go, a, rec_weight.contiguous(), c10::nullopt, {1, 1}, {1, 1}, {1, 1},
                                             false, {0, 0}, 1, {true, true, false});
  at::Tensor da = std::get<0>(conv_grads).contiguous(fmt);
  UpdateTailGrads out{at::empty_like(s), std::get<1>(conv_grads).contiguous(), at::empty({k}, g.options()),
                      at::empty({k}, g.options())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rla_update_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto act) {
      bn_act_backward<decltype(act)>(da.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                     out.ds.data_ptr<scalar_t>(), L, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
                                     g.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps, training,
                                     out.dgamma.data_ptr<acc_t>(), out.dbeta.data_ptr<acc_t>());
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
  return out;
}

}  // namespace rla_ext::cpu
