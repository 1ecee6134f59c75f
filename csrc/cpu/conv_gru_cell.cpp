// The ConvGRU cell on CPU (rla_ext/ops/conv_gru_cell.py has the math and the op contract):
//   zg = Wg * cat(x, h) + bg                        (r, u pre-norm)
//   r, u = sigmoid(GN(zg))                            (one GroupNorm group per gate and sample)
//   zo = Wo * cat(x, r h) + bo
//   h' = u h + (1 - u) tanh(GN(zo))
// The 3x3 convs are ATen's (oneDNN), over a transient concatenation or the weight's column segments
// (conv3x3_of_cat); the statistics and the gating are fused passes (csrc/cpu/conv_cell.h).
// Saved for backward: zg, zo and the per-sample (mean, rstd) of the three groups (stats (N, 3, 2));
// backward recomputes r, u, y from them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/common.h"
#include "cpu/conv_cell.h"
#include "cpu/fast_math.h"

namespace rla_ext::cpu {
namespace {

constexpr const char* kOp = "conv_gru_cell";
constexpr int64_t kSlots = 3;  // stats slots per sample: r, u, output

void check_inputs(const at::Tensor& x, const at::Tensor& h, const at::Tensor& wg, const at::Tensor& wo,
                  const at::Tensor& gamma, const at::Tensor& beta) {
  check_activation(kOp, "x", x, x, "x");
  check_activation(kOp, "h", h, x, "x");
  const int64_t K = h.size(1), C = x.size(1);
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(2) == x.size(2) && h.size(3) == x.size(3), kOp, ": h ", h.sizes(),
              " does not match x ", x.sizes(), " (N, H, W must be equal)");
  check_weight(kOp, "gate_weight", wg, {2 * K, C + K, 3, 3}, x, "x");
  check_weight(kOp, "output_weight", wo, {K, C + K, 3, 3}, x, "x");
  const auto sd = stat_dtype(x.scalar_type());
  check_stat(kOp, "gamma", gamma, 3 * K, sd);
  check_stat(kOp, "beta", beta, 3 * K, sd);
}

void check_bias(const char* name, const at::Tensor& b, int64_t channels, const at::Tensor& x) {
  check_weight(kOp, name, b, {channels}, x, "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& wo,
    const at::Tensor& bo, const at::Tensor& gamma_in, const at::Tensor& beta_in, double eps) {
  check_inputs(x_in, h_in, wg, wo, gamma_in, beta_in);
  const int64_t N = x_in.size(0), K = h_in.size(1);
  check_bias("gate_bias", bg, 2 * K, x_in);
  check_bias("output_bias", bo, K, x_in);
  const auto fmt = memory_format_of(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt);
  const at::Tensor gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  const at::Tensor zg = conv3x3_of_cat(x, h, wg, bg, fmt);
  at::Tensor stats = at::empty({N, kSlots, 2}, gamma.options());
  at::Tensor rh = at::empty_like(h);
  const int64_t HW = x.size(2) * x.size(3);
  const CellLayout L2{N, K, HW, 2, cl}, L1{N, K, HW, 1, cl};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_gru_cell_fwd_r", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = zg.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* rhp = rh.data_ptr<scalar_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    const acc_t* ga = gamma.const_data_ptr<acc_t>();
    const acc_t* be = beta.const_data_ptr<acc_t>();
    gate_group_stats(z, L2, eps, st, kSlots, 0);
    for_each_cell_element(L2, [=](int64_t n, int64_t c, int64_t s, int64_t w, int64_t) {
      const acc_t* sr = st + n * kSlots * 2;
      const acc_t r = sigmoid_approx((static_cast<acc_t>(z[w]) - sr[0]) * sr[1] * ga[c] + be[c]);
      rhp[s] = static_cast<scalar_t>(r * static_cast<acc_t>(hp[s]));
    });
  });

  const at::Tensor zo = conv3x3_of_cat(x, rh, wo, bo, fmt);
  at::Tensor out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_gru_cell_fwd_out", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zgp = zg.const_data_ptr<scalar_t>();
    const scalar_t* zop = zo.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    const acc_t* ga = gamma.const_data_ptr<acc_t>();
    const acc_t* be = beta.const_data_ptr<acc_t>();
    gate_group_stats(zop, L1, eps, st, kSlots, 2);
    for_each_cell_element(L2, [=](int64_t n, int64_t c, int64_t s, int64_t w, int64_t gs) {
      const acc_t* sn = st + n * kSlots * 2;
      const acc_t u = sigmoid_approx((static_cast<acc_t>(zgp[w + gs]) - sn[2]) * sn[3] * ga[K + c] + be[K + c]);
      const acc_t y = tanh_approx((static_cast<acc_t>(zop[s]) - sn[4]) * sn[5] * ga[2 * K + c] + be[2 * K + c]);
      op[s] = static_cast<scalar_t>(u * static_cast<acc_t>(hp[s]) + (acc_t(1) - u) * y);
    });
  });
  return {out, zg, zo, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& wg,
    const at::Tensor& wo, const at::Tensor& gamma_in, const at::Tensor& beta_in, const at::Tensor& zg_in,
    const at::Tensor& zo_in, const at::Tensor& stats_in) {
  check_inputs(x_in, h_in, wg, wo, gamma_in, beta_in);
  const int64_t N = x_in.size(0), K = h_in.size(1);
  check_activation(kOp, "grad_out", grad_out, x_in, "x");
  check_activation(kOp, "zg", zg_in, x_in, "x");
  check_activation(kOp, "zo", zo_in, x_in, "x");
  TORCH_CHECK(grad_out.sizes() == h_in.sizes() && zo_in.sizes() == h_in.sizes(), kOp,
              ": grad_out and zo must have h's shape ", h_in.sizes(), ", got ", grad_out.sizes(), " and ",
              zo_in.sizes());
  TORCH_CHECK(zg_in.size(0) == N && zg_in.size(1) == 2 * K && zg_in.size(2) == x_in.size(2) &&
                  zg_in.size(3) == x_in.size(3), kOp, ": zg must have shape (N, 2k, H, W), got ", zg_in.sizes());
  TORCH_CHECK(stats_in.dim() == 3 && stats_in.size(0) == N && stats_in.size(1) == kSlots && stats_in.size(2) == 2 &&
                  stats_in.scalar_type() == gamma_in.scalar_type(), kOp,
              ": stats must be (N, 3, 2) in the statistics dtype, got ", stats_in.sizes(), " ",
              stats_in.scalar_type());
  const auto fmt = memory_format_of(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), go = grad_out.contiguous(fmt);
  const at::Tensor zg = zg_in.contiguous(fmt), zo = zo_in.contiguous(fmt), stats = stats_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  const int64_t HW = x.size(2) * x.size(3);
  const CellLayout L2{N, K, HW, 2, cl}, L1{N, K, HW, 1, cl};
  const auto acc_opts = gamma.options();  // the statistics dtype is the accumulation dtype

  // Pass 1: recompute u, y, r; gradients at the norm outputs of u and of the output; the direct dh.
  at::Tensor gu = at::empty(h.sizes(), acc_opts.memory_format(fmt)), gy = at::empty_like(gu);
  at::Tensor gr = at::empty_like(gu), dhp = at::empty_like(gu);
  at::Tensor rh = at::empty_like(h), dzo = at::empty_like(h), dzg = at::empty_like(zg);
  at::Tensor dgamma = at::empty({3 * K}, gamma.options()), dbeta = at::empty_like(dgamma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_gru_cell_bwd_out", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *zgp = zg.const_data_ptr<scalar_t>(), *zop = zo.const_data_ptr<scalar_t>();
    const scalar_t *hp = h.const_data_ptr<scalar_t>(), *gop = go.const_data_ptr<scalar_t>();
    const acc_t *st = stats.const_data_ptr<acc_t>(), *ga = gamma.const_data_ptr<acc_t>(),
                *be = beta.const_data_ptr<acc_t>();
    acc_t *gup = gu.data_ptr<acc_t>(), *gyp = gy.data_ptr<acc_t>(), *dhpp = dhp.data_ptr<acc_t>();
    scalar_t* rhp = rh.data_ptr<scalar_t>();
    for_each_cell_element(L2, [=](int64_t n, int64_t c, int64_t s, int64_t w, int64_t gs) {
      const acc_t* sn = st + n * kSlots * 2;
      const acc_t r = sigmoid_approx((static_cast<acc_t>(zgp[w]) - sn[0]) * sn[1] * ga[c] + be[c]);
      const acc_t u = sigmoid_approx((static_cast<acc_t>(zgp[w + gs]) - sn[2]) * sn[3] * ga[K + c] + be[K + c]);
      const acc_t y = tanh_approx((static_cast<acc_t>(zop[s]) - sn[4]) * sn[5] * ga[2 * K + c] + be[2 * K + c]);
      const acc_t hv = static_cast<acc_t>(hp[s]), gv = static_cast<acc_t>(gop[s]);
      rhp[s] = static_cast<scalar_t>(r * hv);
      gup[s] = gv * (hv - y) * (u * (acc_t(1) - u));
      gyp[s] = gv * (acc_t(1) - u) * (acc_t(1) - y * y);
      dhpp[s] = gv * u;
    });
    gate_group_norm_backward(gyp, zop, dzo.data_ptr<scalar_t>(), L1, 0, st, kSlots, 2, ga + 2 * K,
                             dgamma.data_ptr<acc_t>() + 2 * K, dbeta.data_ptr<acc_t>() + 2 * K);
  });
  const CatConvGrads out_conv = conv3x3_of_cat_backward(dzo, x, rh, wo, true, fmt);
  const at::Tensor& drh = out_conv.db;

  // Pass 2: the reset gate's gradient through r * h; the r and u norms' backward into dzg.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_gru_cell_bwd_gates", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *zgp = zg.const_data_ptr<scalar_t>(), *hp = h.const_data_ptr<scalar_t>(),
                   *drhp = drh.const_data_ptr<scalar_t>();
    const acc_t *st = stats.const_data_ptr<acc_t>(), *ga = gamma.const_data_ptr<acc_t>(),
                *be = beta.const_data_ptr<acc_t>();
    acc_t *grp = gr.data_ptr<acc_t>(), *dhpp = dhp.data_ptr<acc_t>();
    for_each_cell_element(L2, [=](int64_t n, int64_t c, int64_t s, int64_t w, int64_t) {
      const acc_t* sn = st + n * kSlots * 2;
      const acc_t r = sigmoid_approx((static_cast<acc_t>(zgp[w]) - sn[0]) * sn[1] * ga[c] + be[c]);
      const acc_t d = static_cast<acc_t>(drhp[s]);
      grp[s] = d * static_cast<acc_t>(hp[s]) * (r * (acc_t(1) - r));
      dhpp[s] += d * r;
    });
    scalar_t* dzgp = dzg.data_ptr<scalar_t>();
    gate_group_norm_backward(gr.const_data_ptr<acc_t>(), zgp, dzgp, L2, 0, st, kSlots, 0, ga,
                             dgamma.data_ptr<acc_t>(), dbeta.data_ptr<acc_t>());
    gate_group_norm_backward(gu.const_data_ptr<acc_t>(), zgp, dzgp, L2, 1, st, kSlots, 1, ga + K,
                             dgamma.data_ptr<acc_t>() + K, dbeta.data_ptr<acc_t>() + K);
  });
  const CatConvGrads gate_conv = conv3x3_of_cat_backward(dzg, x, h, wg, true, fmt);
  at::Tensor dx = out_conv.da;
  dx.add_(gate_conv.da);
  const at::Tensor& dh_g = gate_conv.db;
  at::Tensor dh = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_gru_cell_bwd_dh", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* a = dhp.const_data_ptr<acc_t>();
    const scalar_t* b = dh_g.const_data_ptr<scalar_t>();
    scalar_t* d = dh.data_ptr<scalar_t>();
    for_each_cell_element(L1, [=](int64_t, int64_t, int64_t s, int64_t, int64_t) {
      d[s] = static_cast<scalar_t>(a[s] + static_cast<acc_t>(b[s]));
    });
  });
  return {dx, dh, gate_conv.dw, gate_conv.dbias, out_conv.dw, out_conv.dbias, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("conv_gru_cell_kernel_fwd", &forward);
  m.impl("conv_gru_cell_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
