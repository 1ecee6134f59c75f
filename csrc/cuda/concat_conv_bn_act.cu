// CUDA kernels of op A, concat_conv_bn_act: act(batch_norm(conv1x1(cat(x, h)))) without building
// cat(x, h). See docs/ARCHITECTURE.md for the contract.
//
// The 1x1 conv splits its reduction at the concatenation, so cat(x, h) never exists: a GEMM computes
// the x-part (channels_last as an (N*H*W, C) row-major GEMM, NCHW as a batched GEMM over images) and
// leaves it UNROUNDED in the accumulation dtype (float for half types); the k-channel h-part is added
// per element (ConcatZ, concat_z.cuh, shared with the block boundary) and z is rounded to T once, as a
// single GEMM over cat(x, h) would round it. That step is fused into the BatchNorm statistics pass
// (training) or is one elementwise pass (eval). After it,
// the shared BatchNorm machinery of batchnorm.cuh: one normalise+activation pass forward; one fused
// activation+BatchNorm reduction and one elementwise pass backward.
#include <ATen/ATen.h>

#include "batchnorm.cuh"
#include "concat_z.cuh"
#include "ops.h"

namespace rla_ext {
namespace cuda {
namespace {

// zx = weight[:, :C] @ x (plus weight[:, C:] @ h when k > kMaxDirectH) into `zx`, a tensor of the
// accumulation dtype in the format of x; returns how many h channels ConcatZ must still add.
int64_t concat_gemm(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, at::Tensor& zx, bool cl) {
  const int64_t N = x.size(0), C = x.size(1), k = h.size(1), Co = weight.size(0);
  const at::Tensor wx = weight.narrow(1, 0, C);  // (Co, C), row stride C + k: cuBLAS takes it as is
  if (cl) {
    at::Tensor zx2 = rows_view(zx);
    mm_into(zx2, rows_view(x), wx.t());
  } else {
    at::Tensor zx3 = planes_view(zx);
    // The weight is broadcast over the batch with stride 0; no copy.
    bmm_into(zx3, wx.unsqueeze(0).expand({N, Co, C}), planes_view(x));
  }
  return add_wide_h_part(zx, h, weight.narrow(1, C, k), cl);
}

void check_common(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
                  const at::Tensor& beta, bool cl) {
  TORCH_CHECK(is_device_tensor(x), "x: expected a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, "x: expected a 4-D tensor, got ", x.sizes());
  check_format("x", x, cl);
  check_act("h", h, x, cl);
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(2) == x.size(2) && h.size(3) == x.size(3),
              "h: expected shape (N, k, H, W) matching x ", x.sizes(), ", got ", h.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) + h.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "weight: expected a contiguous (C_out, C + k) matrix of x's dtype and device, got ", weight.sizes());
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  check_stat_vector("gamma", gamma, weight.size(0), sd, x);
  check_stat_vector("beta", beta, weight.size(0), sd, x);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv_bn_act_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps,
    bool relu) {
  const bool cl = is_channels_last(x);
  check_common(x, h, weight, gamma, beta, cl);
  TORCH_CHECK(mean.has_value() == var.has_value(), "mean, var: give both or neither");
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = weight.size(0), k = h.size(1);
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  const bool training = !mean.has_value();
  if (!training) {
    check_stat_vector("mean", *mean, Co, sd, x);
    check_stat_vector("var", *var, Co, sd, x);
  }

  at::Tensor z = empty_act(x, N, Co, H, W, cl);
  at::Tensor out = device_empty_like(z);
  at::Tensor mean_out, var_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_conv_bn_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      constexpr bool same = std::is_same_v<acc_t, scalar_t>;
      at::Tensor zx = same ? z : device_empty({N, Co, H, W}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value)
                                                                 .memory_format(format_of(CL)));
      const int64_t kh = concat_gemm(x, h, weight, zx, CL);
      ConcatZ<scalar_t, CL, acc_t> cz{zx.data_ptr<acc_t>(), z.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                      weight.data_ptr<scalar_t>() + C, Co, H * W, kh, C + k, Co, 0};
      std::tie(mean_out, var_out) = entry_forward<scalar_t, CL>(cz, z, out, mean, var, gamma, beta, eps, relu);
    });
  });
  return {out, z, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv_bn_act_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, double eps, bool relu, bool training) {
  const bool cl = is_channels_last(x);
  check_common(x, h, weight, gamma, beta, cl);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t k = h.size(1), Co = weight.size(0);
  const DeviceGuard guard(x.device());
  auto [dz, dgamma, dbeta] =
      entry_bn_act_backward(grad_out, z, x, mean, var, gamma, beta, Co, H, W, eps, relu, training, cl);

  // dx = Wx^T dz, dh = Wh^T dz, written straight into their own tensors; dW per slice.
  const at::Tensor wx = weight.narrow(1, 0, C);
  const at::Tensor wh = weight.narrow(1, C, k);
  at::Tensor dx = empty_act(x, N, C, H, W, cl);
  at::Tensor dh = empty_act(h, N, k, H, W, cl);
  at::Tensor dweight = device_empty_like(weight);
  if (cl) {
    const at::Tensor dz2 = rows_view(dz);
    at::Tensor dx2 = rows_view(dx);
    at::Tensor dh2 = rows_view(dh);
    at::mm_out(dx2, dz2, wx);
    at::mm_out(dh2, dz2, wh);
    // One GEMM per slice over K = N*H*W, accumulated by cuBLAS in fp32.
    at::Tensor dwx = dweight.narrow(1, 0, C);
    at::Tensor dwh = dweight.narrow(1, C, k);
    at::mm_out(dwx, dz2.t(), rows_view(x));
    at::mm_out(dwh, dz2.t(), rows_view(h));
  } else {
    const at::Tensor dz3 = planes_view(dz);
    at::Tensor dx3 = planes_view(dx);
    at::Tensor dh3 = planes_view(dh);
    at::bmm_out(dx3, wx.t().unsqueeze(0).expand({N, C, Co}), dz3);
    at::bmm_out(dh3, wh.t().unsqueeze(0).expand({N, k, Co}), dz3);
    dweight.narrow(1, 0, C).copy_(nchw_weight_grad(dz3, planes_view(x)));
    dweight.narrow(1, C, k).copy_(nchw_weight_grad(dz3, planes_view(h)));
  }
  return {dx, dh, dweight, dgamma, dbeta};
}

}  // namespace cuda
}  // namespace rla_ext
