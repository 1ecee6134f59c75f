// The ConvLSTM cell on CPU (rla_ext/ops/conv_lstm_cell.py has the math and the op contract):
//   z = W * cat(x, h) + b      (gates i, f, o, g; cpu/conv_cell.h's conv3x3_of_cat: the concatenation
//                               is transient or never built)
//   c' = sigmoid(f) c + sigmoid(i) tanh(g);   h' = sigmoid(o) tanh(c')
// z is saved for backward. Backward: one elementwise pass from (z, c, c', grad h', grad c') to dz and
// dc, then the convolution's input and weight gradients (ATen / oneDNN) on the forward's route.
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

constexpr const char* kOp = "conv_lstm_cell";

void check_inputs(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w) {
  check_activation(kOp, "x", x, x, "x");
  check_activation(kOp, "h", h, x, "x");
  check_activation(kOp, "c", c, x, "x");
  const int64_t K = h.size(1), C = x.size(1);
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(2) == x.size(2) && h.size(3) == x.size(3), kOp, ": h ", h.sizes(),
              " does not match x ", x.sizes(), " (N, H, W must be equal)");
  TORCH_CHECK(c.sizes() == h.sizes(), kOp, ": c must have h's shape ", h.sizes(), ", got ", c.sizes());
  check_weight(kOp, "weight", w, {4 * K, C + K, 3, 3}, x, "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& h_in,
                                                       const at::Tensor& c_in, const at::Tensor& w,
                                                       const at::Tensor& bias) {
  check_inputs(x_in, h_in, c_in, w);
  const int64_t N = x_in.size(0), K = h_in.size(1);
  check_weight(kOp, "bias", bias, {4 * K}, x_in, "x");
  const auto fmt = memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), c = c_in.contiguous(fmt);
  const at::Tensor z = conv3x3_of_cat(x, h, w, bias, fmt);
  at::Tensor h_out = at::empty_like(h), c_out = at::empty_like(h);
  const CellLayout L{N, K, x.size(2) * x.size(3), 4, fmt == at::MemoryFormat::ChannelsLast};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_lstm_cell_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *cp = c.const_data_ptr<scalar_t>();
    scalar_t *hop = h_out.data_ptr<scalar_t>(), *cop = c_out.data_ptr<scalar_t>();
    for_each_cell_element(L, [=](int64_t, int64_t, int64_t s, int64_t w0, int64_t gs) {
      // From z as stored: backward recomputes the gates from the saved z.
      acc_t g4[4];
      for (int j = 0; j < 4; ++j) g4[j] = static_cast<acc_t>(zp[w0 + j * gs]);
      const scalar_t cn = static_cast<scalar_t>(sigmoid_approx(g4[1]) * static_cast<acc_t>(cp[s]) +
                                                sigmoid_approx(g4[0]) * tanh_approx(g4[3]));
      cop[s] = cn;
      hop[s] = static_cast<scalar_t>(sigmoid_approx(g4[2]) * tanh_approx(static_cast<acc_t>(cn)));
    });
  });
  return {h_out, c_out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& x_in, const at::Tensor& h_in,
    const at::Tensor& c_in, const at::Tensor& w, const at::Tensor& z_in, const at::Tensor& c_out_in) {
  check_inputs(x_in, h_in, c_in, w);
  const int64_t N = x_in.size(0), K = h_in.size(1);
  check_activation(kOp, "grad_h", grad_h, x_in, "x");
  check_activation(kOp, "grad_c", grad_c, x_in, "x");
  check_activation(kOp, "z", z_in, x_in, "x");
  check_activation(kOp, "c_out", c_out_in, x_in, "x");
  TORCH_CHECK(grad_h.sizes() == h_in.sizes() && grad_c.sizes() == h_in.sizes() && c_out_in.sizes() == h_in.sizes(),
              kOp, ": grad_h, grad_c and c_out must have h's shape ", h_in.sizes());
  TORCH_CHECK(z_in.size(0) == N && z_in.size(1) == 4 * K && z_in.size(2) == x_in.size(2) &&
                  z_in.size(3) == x_in.size(3), kOp, ": z must have shape (N, 4k, H, W), got ", z_in.sizes());
  const auto fmt = memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), h = h_in.contiguous(fmt), c = c_in.contiguous(fmt);
  const at::Tensor gh = grad_h.contiguous(fmt), gc = grad_c.contiguous(fmt);
  const at::Tensor z = z_in.contiguous(fmt), cn = c_out_in.contiguous(fmt);
  at::Tensor dz = at::empty_like(z), dc = at::empty_like(c);
  const CellLayout L{N, K, x.size(2) * x.size(3), 4, fmt == at::MemoryFormat::ChannelsLast};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_lstm_cell_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *cp = c.const_data_ptr<scalar_t>(),
                   *cnp = cn.const_data_ptr<scalar_t>(), *ghp = gh.const_data_ptr<scalar_t>(),
                   *gcp = gc.const_data_ptr<scalar_t>();
    scalar_t *dzp = dz.data_ptr<scalar_t>(), *dcp = dc.data_ptr<scalar_t>();
    for_each_cell_element(L, [=](int64_t, int64_t, int64_t s, int64_t w0, int64_t gs) {
      const acc_t si = sigmoid_approx(static_cast<acc_t>(zp[w0]));
      const acc_t sf = sigmoid_approx(static_cast<acc_t>(zp[w0 + gs]));
      const acc_t so = sigmoid_approx(static_cast<acc_t>(zp[w0 + 2 * gs]));
      const acc_t tg = tanh_approx(static_cast<acc_t>(zp[w0 + 3 * gs]));
      const acc_t tc = tanh_approx(static_cast<acc_t>(cnp[s]));
      const acc_t ghv = static_cast<acc_t>(ghp[s]);
      const acc_t dct = static_cast<acc_t>(gcp[s]) + ghv * so * (acc_t(1) - tc * tc);
      dzp[w0] = static_cast<scalar_t>(dct * tg * (si * (acc_t(1) - si)));
      dzp[w0 + gs] = static_cast<scalar_t>(dct * static_cast<acc_t>(cp[s]) * (sf * (acc_t(1) - sf)));
      dzp[w0 + 2 * gs] = static_cast<scalar_t>(ghv * tc * (so * (acc_t(1) - so)));
      dzp[w0 + 3 * gs] = static_cast<scalar_t>(dct * si * (acc_t(1) - tg * tg));
      dcp[s] = static_cast<scalar_t>(dct * sf);
    });
  });
  const CatConvGrads g = conv3x3_of_cat_backward(dz, x, h, w, true, fmt);
  return {g.da, g.db, dc, g.dw, g.dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("conv_lstm_cell_kernel_fwd", &forward);
  m.impl("conv_lstm_cell_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
