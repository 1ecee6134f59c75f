// The basic-block entry on CPU: act(bn(conv3x3(cat(x, h), W, stride, padding 1))) without keeping
// cat(x, h). The conv is one ATen (oneDNN) convolution over a concatenation that lives for the call
// only, or two with the weight's column segments, x's and h's, summed into one output z (conv_over_cat
// in cpu/conv_cell.h decides by size); BatchNorm and the activation are the fused passes of
// cpu/bn_act.h (the same as op A's). Backward: the fused activation + BatchNorm backward, then ATen's
// convolution backward on the same route, the weight gradient as (C_out, C + k, 3, 3).
// Contract: docs/ARCHITECTURE.md.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/bn_act.h"
#include "cpu/common.h"
#include "cpu/conv_cell.h"

namespace rla_ext::cpu {
namespace {

constexpr const char* kOp = "concat_conv3x3_bn_act";

// The conv's output side: 3x3, padding 1.
int64_t out_side(int64_t side, int64_t stride) { return (side - 1) / stride + 1; }

void check_inputs(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
                  const at::Tensor& beta, int64_t stride) {
  check_entry_activations(kOp, x, h);
  TORCH_CHECK(weight.dim() == 4, kOp, ": weight must be a 4-D (C_out, C + k, 3, 3) tensor, got shape ",
              weight.sizes());
  check_weight(kOp, "weight", weight, {weight.size(0), x.size(1) + h.size(1), 3, 3}, x, "x");
  TORCH_CHECK(stride >= 1, kOp, ": stride must be positive, got ", stride);
  check_entry_affine(kOp, gamma, beta, weight.size(0), x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const c10::optional<at::Tensor>& mean_in, const c10::optional<at::Tensor>& var_in,
    int64_t stride, double eps, bool relu) {
  check_inputs(x_in, h_in, weight, gamma, beta, stride);
  const auto fmt = memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt);
  // One conv over a transient cat(x, h), or two over the weight's segments (conv_over_cat); for half
  // types the latter rounds each conv and their sum: one rounding more, within the half-precision bar.
  const at::Tensor z = conv3x3_of_cat(x, h, weight, c10::nullopt, fmt, stride);
  // The stored z is what the statistics and the backward see.
  StatInputs st = stat_inputs(kOp, mean_in, var_in, z.size(1), stat_dtype(z.scalar_type()));
  at::Tensor out = bn_act_forward(z, st, gamma, beta, eps, relu, fmt);
  return {out, z, st.mean, st.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& z_in, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, double eps, bool relu, bool training) {
  check_inputs(x_in, h_in, weight, gamma, beta, stride);
  const int64_t Co = weight.size(0);
  const std::vector<int64_t> zshape{x_in.size(0), Co, out_side(x_in.size(2), stride), out_side(x_in.size(3), stride)};
  check_backward_inputs(kOp, "z", z_in, grad_out, mean, var, zshape, x_in, "x");

  const auto fmt = memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), z = z_in.contiguous(fmt);
  auto [dz, dgamma, dbeta] =
      bn_act_backward_pass(grad_out.contiguous(fmt), z, mean, var, gamma, beta, eps, relu, training, fmt);
  const CatConvGrads g = conv3x3_of_cat_backward(dz, x, h, weight, false, fmt, stride);
  return {g.da, g.db, g.dw, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("concat_conv3x3_bn_act_kernel_fwd", &forward);
  m.impl("concat_conv3x3_bn_act_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
