// CUDA kernels of op B, rla_update: conv3x3(tanh(batch_norm(avgpool2x2?(h) + conv1x1(y)))).
// See docs/ARCHITECTURE.md for the contract.
//
// The 1x1 GEMM writes t = out_weight @ y into the buffer that becomes s; the rest is the update tail
// of update_tail.cuh (shared with the block boundary, rla_update_and_entry.cu).
#include <ATen/ATen.h>

#include "batchnorm.cuh"
#include "ops.h"
#include "update_tail.cuh"

namespace rla_ext {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_update_fwd_cuda(
    const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
    const at::Tensor& rec_weight, bool pool, double eps) {
  const bool cl = is_channels_last(y);
  const UpdateGeometry g = check_update_inputs(h, y, out_weight, gamma, beta, rec_weight, pool, cl);
  check_update_stats(mean, var, g.k, y);
  const DeviceGuard guard(y.device());

  // t = out_weight @ y per pixel, into the buffer that becomes s.
  at::Tensor s = empty_act(y, g.N, g.k, g.H, g.W, cl);
  if (cl) {
    at::Tensor s2 = rows_view(s);
    at::mm_out(s2, rows_view(y), out_weight.t());
  } else {
    at::Tensor s3 = planes_view(s);
    at::bmm_out(s3, out_weight.unsqueeze(0).expand({g.N, g.k, g.C}), planes_view(y));
  }

  at::Tensor out, mean_out, var_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "rla_update_fwd_cuda", [&] {
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      std::tie(out, mean_out, var_out) = update_tail_forward<scalar_t, CL>(
          s.data_ptr<scalar_t>(), g.k, 0, s, h, pool, mean, var, gamma, beta, rec_weight, eps);
    });
  });
  return {out, s, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_update_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& s,
    const at::Tensor& mean, const at::Tensor& var, bool pool, double eps, bool training) {
  const bool cl = is_channels_last(y);
  const UpdateGeometry g = check_update_inputs(h, y, out_weight, gamma, beta, rec_weight, pool, cl);
  check_act("s", s, y, cl);
  check_act("grad_out", grad_out, y, cl);
  TORCH_CHECK(s.size(0) == g.N && s.size(1) == g.k && s.size(2) == g.H && s.size(3) == g.W, "s: expected shape (",
              g.N, ", ", g.k, ", ", g.H, ", ", g.W, "), got ", s.sizes());
  TORCH_CHECK(grad_out.sizes() == s.sizes(), "grad_out: expected shape ", s.sizes(), ", got ", grad_out.sizes());
  const at::ScalarType sd = stat_dtype_for(y.scalar_type());
  check_stat_vector("mean", mean, g.k, sd, y);
  check_stat_vector("var", var, g.k, sd, y);
  const DeviceGuard guard(y.device());

  auto [ds, dh, drec, dgamma, dbeta] =
      update_tail_backward_pass(grad_out, s, h, rec_weight, mean, var, gamma, beta, eps, pool, training, cl);

  at::Tensor dy = empty_act(y, g.N, g.C, g.H, g.W, cl);
  at::Tensor dout_weight = device_empty_like(out_weight);
  if (cl) {
    const at::Tensor ds2 = rows_view(ds);
    at::Tensor dy2 = rows_view(dy);
    at::mm_out(dy2, ds2, out_weight);
    at::mm_out(dout_weight, ds2.t(), rows_view(y));
  } else {
    const at::Tensor ds3 = planes_view(ds);
    at::Tensor dy3 = planes_view(dy);
    at::bmm_out(dy3, out_weight.t().unsqueeze(0).expand({g.N, g.C, g.k}), ds3);
    dout_weight.copy_(nchw_weight_grad(ds3, planes_view(y)));
  }
  return {dh, dy, dout_weight, drec, dgamma, dbeta};
}

}  // namespace cuda
}  // namespace rla_ext
