// CUDA kernels of op A, concat_conv_bn_act: act(batch_norm(conv1x1(cat(x, h)))) without building
// cat(x, h). See docs/ARCHITECTURE.md for the contract.
//
// The 1x1 conv is two GEMMs accumulating into one output, one per weight slice, so the concatenation
// exists only as the split of the reduction: channels_last runs them as (N*H*W, C) row-major GEMMs,
// NCHW as batched GEMMs over images. Everything after the GEMMs is the shared BatchNorm machinery of
// batchnorm.cuh: one statistics reduction, one normalise+activation pass forward; one fused
// activation+BatchNorm reduction and one elementwise pass backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "batchnorm.cuh"

namespace rla_ext {
namespace cuda {
namespace {

template <typename F>
void with_act(bool relu, F&& f) {
  if (relu) {
    f(ActRelu{});
  } else {
    f(ActNone{});
  }
}

// z = weight[:, :C] @ x + weight[:, C:] @ h per pixel, written in the format of x.
at::Tensor conv1x1_two_slices(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, bool cl) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t k = h.size(1), Co = weight.size(0);
  const at::Tensor wx = weight.narrow(1, 0, C);  // (Co, C), row stride C + k: cuBLAS takes it as is
  const at::Tensor wh = weight.narrow(1, C, k);
  at::Tensor z = empty_act(x, N, Co, H, W, cl);
  if (cl) {
    at::Tensor z2 = rows_view(z);
    at::mm_out(z2, rows_view(x), wx.t());
    z2.addmm_(rows_view(h), wh.t());
  } else {
    at::Tensor z3 = planes_view(z);
    // The weight is broadcast over the batch with stride 0; no copy.
    at::bmm_out(z3, wx.unsqueeze(0).expand({N, Co, C}), planes_view(x));
    z3.baddbmm_(wh.unsqueeze(0).expand({N, Co, k}), planes_view(h));
  }
  return z;
}

void check_common(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
                  const at::Tensor& beta, bool cl) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor");
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv_bn_act_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps,
    bool relu) {
  const bool cl = is_channels_last(x);
  check_common(x, h, weight, gamma, beta, cl);
  TORCH_CHECK(mean.has_value() == var.has_value(), "mean, var: give both or neither");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t Co = weight.size(0);
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  const bool training = !mean.has_value();
  if (!training) {
    check_stat_vector("mean", *mean, Co, sd, x);
    check_stat_vector("var", *var, Co, sd, x);
  }

  at::Tensor z = conv1x1_two_slices(x, h, weight, cl);
  at::Tensor out = at::empty_like(z);
  at::Tensor mean_out, var_out, params;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_conv_bn_act_fwd_cuda", [&] {
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      if (training) {
        mean_out = at::empty({Co}, gamma.options());
        var_out = at::empty({Co}, gamma.options());
        params = at::empty({4, Co}, gamma.options());
        launch_batch_stats<scalar_t, CL>(z, gamma, beta, eps, mean_out, var_out, params);
      } else {
        // Returned stats must not alias the inputs (custom-op rule), hence the copies.
        mean_out = mean->clone();
        var_out = var->clone();
        params = bn_params_from_stats(mean_out, var_out, gamma, beta, eps);
      }
      with_act(relu, [&](auto act) { launch_bn_act<scalar_t, CL, decltype(act)>(z, out, params); });
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
  check_act("z", z, x, cl);
  check_act("grad_out", grad_out, x, cl);
  TORCH_CHECK(z.size(0) == N && z.size(1) == Co && z.size(2) == H && z.size(3) == W, "z: expected shape (", N,
              ", ", Co, ", ", H, ", ", W, "), got ", z.sizes());
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "grad_out: expected shape ", z.sizes(), ", got ", grad_out.sizes());
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  check_stat_vector("mean", mean, Co, sd, x);
  check_stat_vector("var", var, Co, sd, x);
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor params = bn_params_from_stats(mean, var, gamma, beta, eps);
  at::Tensor dgamma = at::empty({Co}, gamma.options());
  at::Tensor dbeta = at::empty({Co}, gamma.options());
  at::Tensor dz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_conv_bn_act_bwd_cuda", [&] {
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      with_act(relu, [&](auto act) {
        dz = bn_act_backward<scalar_t, CL, decltype(act)>(grad_out, z, params, dgamma, dbeta, training);
      });
    });
  });

  // dx = Wx^T dz, dh = Wh^T dz, written straight into their own tensors; dW per slice.
  const at::Tensor wx = weight.narrow(1, 0, C);
  const at::Tensor wh = weight.narrow(1, C, k);
  at::Tensor dx = empty_act(x, N, C, H, W, cl);
  at::Tensor dh = empty_act(h, N, k, H, W, cl);
  at::Tensor dweight = at::empty_like(weight);
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

}  // namespace
}  // namespace cuda
}  // namespace rla_ext

TORCH_LIBRARY_IMPL(rla_ext, CUDA, m) {
  m.impl("concat_conv_bn_act_kernel_fwd", &rla_ext::cuda::concat_conv_bn_act_fwd_cuda);
  m.impl("concat_conv_bn_act_kernel_bwd", &rla_ext::cuda::concat_conv_bn_act_bwd_cuda);
}
