// The basic-block entry on CPU: act(bn(conv3x3(cat(x, h), W, stride, padding 1))) without keeping
// cat(x, h). The conv is two ATen (oneDNN) convolutions with the weight's column segments, x's and
// h's, summed into one output z, or, where that measured slower (conv_over_cat), one over a
// concatenation that lives for the call only; BatchNorm and the activation are the fused passes of
// cpu/bn_act.h (the same as op A's). Backward: the fused activation + BatchNorm backward, then ATen's
// convolution backward per segment (or over the rebuilt concatenation), the weight gradient as
// (C_out, C + k, 3, 3). Contract: docs/ARCHITECTURE.md.
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

// Who runs the conv: ONE oneDNN convolution over a transient cat(x, h) while that concatenation is at
// most 1 MiB, else two over the weight's column segments summed into z. The concatenation costs a
// fresh buffer forward and backward (and dx / dh copied out of dcat); past ~1 MiB that costs more
// than the second convolution saves, whatever C / k. Whole op, forward + backward, against eager,
// measured on 2 cores (AVX-512, fp32, channels_last, k = 16, interleaved medians, two runs):
//   C16xH32 s2, N = 8  (1 MiB):    cat 0.99-1.04x, segments 0.91-0.97x
//   C32xH16 s1, N = 8  (0.4 MiB):  cat 0.98-1.01x, segments 0.93x;   C64xH8, N = 8: 0.99-1.00x vs 0.91x
//   C16xH32 s2, N = 16 (2 MiB):    cat 0.98x, segments 1.17x;        N = 32: 0.94x vs 1.04x
//   C32xH16 s2, N = 32 (1.5 MiB):  cat 0.95x, segments 1.10x;        C64xH16, N = 16: 0.93x vs 1.02x
// The concatenation lives for one call only: backward builds it again and nothing of it is saved.
constexpr int64_t kCatMaxBytes = int64_t{1} << 20;

bool conv_over_cat(const at::Tensor& x, const at::Tensor& h) {
  const int64_t cat_bytes =
      x.size(0) * (x.size(1) + h.size(1)) * x.size(2) * x.size(3) * static_cast<int64_t>(x.element_size());
  return cat_bytes <= kCatMaxBytes;
}

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
  at::Tensor z;
  if (conv_over_cat(x, h)) {
    z = conv3x3(at::cat({x, h}, 1).contiguous(fmt), weight.contiguous(), c10::nullopt, fmt, stride);
  } else {
    // z = conv(x, W[:, :C]) + conv(h, W[:, C:]), added in place (for half types each conv rounds to T
    // and so does the sum: one rounding more than a conv over cat(x, h), within the half-precision bar).
    const WeightSegments seg = split_columns(weight.contiguous(), x.size(1));
    z = conv3x3(x, seg.wx, c10::nullopt, fmt, stride);
    z.add_(conv3x3(h, seg.wh, c10::nullopt, fmt, stride));
  }
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
  const int64_t C = x_in.size(1), Co = weight.size(0);
  const std::vector<int64_t> zshape{x_in.size(0), Co, out_side(x_in.size(2), stride), out_side(x_in.size(3), stride)};
  check_backward_inputs(kOp, "z", z_in, grad_out, mean, var, zshape, x_in, "x");

  const auto fmt = memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), z = z_in.contiguous(fmt);
  auto [dz, dgamma, dbeta] =
      bn_act_backward_pass(grad_out.contiguous(fmt), z, mean, var, gamma, beta, eps, relu, training, fmt);
  const int64_t k = h.size(1);
  if (conv_over_cat(x, h)) {
    auto [dcat, dw, unused] = conv3x3_backward(dz, at::cat({x, h}, 1).contiguous(fmt), weight.contiguous(), false,
                                               fmt, stride);
    return {dcat.narrow(1, 0, C).contiguous(fmt), dcat.narrow(1, C, k).contiguous(fmt), dw.contiguous(), dgamma,
            dbeta};
  }
  const WeightSegments seg = split_columns(weight.contiguous(), C);
  auto [dx, dwx, unused_x] = conv3x3_backward(dz, x, seg.wx, false, fmt, stride);
  auto [dh, dwh, unused_h] = conv3x3_backward(dz, h, seg.wh, false, fmt, stride);
  return {dx, dh, at::cat({dwx, dwh}, 1).contiguous(), dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("concat_conv3x3_bn_act_kernel_fwd", &forward);
  m.impl("concat_conv3x3_bn_act_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
