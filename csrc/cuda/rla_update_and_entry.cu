// CUDA kernels of op C, rla_update_and_entry: the RLA update of step t and the next block's 1x1 entry,
// sharing the read of the block output y. Contract: docs/ARCHITECTURE.md ("Op C").
//
// Forward: ONE GEMM over y with the stacked (Ce + k, C) weight [entry_weight[:, :C]; out_weight] into P,
// kept unrounded in the accumulation dtype. The update tail (update_tail.cuh) reads P[Ce:] in place as
// its t: s = round(pool?(h) + t) with the statistics, then the direct 3x3 conv with tanh(bn) in its
// loads. The entry (concat_z.cuh) reads P[:Ce] in place as its zx: z = round(zx + W_entry[:, C:] h_next)
// with the statistics, then BatchNorm + activation. Backward: the entry's BatchNorm backward gives dz;
// W_entry[:, C:]^T dz joins grad_h_next on the way back through the update tail to ds; dP = [dz; ds]
// then feeds ONE dgrad GEMM into y and ONE weight-gradient GEMM over y with the stacked weight.
#include <ATen/ATen.h>

#include "batchnorm.cuh"
#include "concat_z.cuh"
#include "ops.h"
#include "update_tail.cuh"

namespace rla_ext {
namespace cuda {
namespace {

// The update's checks, then the entry's: entry_weight (Ce, C + k) and its BatchNorm vectors.
UpdateGeometry check_inputs(const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight,
                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rec_weight,
                            const at::Tensor& entry_weight, const at::Tensor& entry_gamma,
                            const at::Tensor& entry_beta, bool pool, bool cl) {
  const UpdateGeometry g = check_update_inputs(h, y, out_weight, gamma, beta, rec_weight, pool, cl);
  TORCH_CHECK(entry_weight.dim() == 2 && entry_weight.size(1) == g.C + g.k && entry_weight.is_contiguous() &&
                  entry_weight.scalar_type() == y.scalar_type() && entry_weight.device() == y.device(),
              "entry_weight: expected a contiguous (C_entry, C + k) matrix of y's dtype and device, got ",
              entry_weight.sizes());
  const at::ScalarType sd = stat_dtype_for(y.scalar_type());
  check_stat_vector("entry_gamma", entry_gamma, entry_weight.size(0), sd, y);
  check_stat_vector("entry_beta", entry_beta, entry_weight.size(0), sd, y);
  return g;
}

// [entry_weight[:, :C]; out_weight]: the (Ce + k, C) weight of the one GEMM over y each way.
at::Tensor stacked_weight(const at::Tensor& out_weight, const at::Tensor& entry_weight, int64_t C) {
  return at::cat({entry_weight.narrow(1, 0, C), out_weight}, 0);
}

void check_saved(const char* name, const at::Tensor& t, const at::Tensor& y, bool cl, int64_t channels) {
  check_act(name, t, y, cl);
  TORCH_CHECK(t.size(0) == y.size(0) && t.size(1) == channels && t.size(2) == y.size(2) && t.size(3) == y.size(3),
              name, ": expected shape (", y.size(0), ", ", channels, ", ", y.size(2), ", ", y.size(3), "), got ",
              t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rla_update_and_entry_fwd_cuda(const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight,
                              const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& var, const at::Tensor& rec_weight,
                              const at::Tensor& entry_weight, const at::Tensor& entry_gamma,
                              const at::Tensor& entry_beta, const std::optional<at::Tensor>& entry_mean,
                              const std::optional<at::Tensor>& entry_var, bool pool, double eps, double entry_eps,
                              bool relu) {
  const bool cl = is_channels_last(y);
  const UpdateGeometry g =
      check_inputs(h, y, out_weight, gamma, beta, rec_weight, entry_weight, entry_gamma, entry_beta, pool, cl);
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, k = g.k, Ce = entry_weight.size(0);
  check_update_stats(mean, var, k, y);
  check_update_stats(entry_mean, entry_var, Ce, y);
  TORCH_CHECK(mean.has_value() == entry_mean.has_value(), "mean, entry_mean: both given (eval) or neither");
  const DeviceGuard guard(y.device());

  const at::Tensor ws = stacked_weight(out_weight, entry_weight, C);
  at::Tensor s = empty_act(y, N, k, H, W, cl);
  at::Tensor z = empty_act(y, N, Ce, H, W, cl);
  at::Tensor out = device_empty_like(z);
  at::Tensor h_next, mean_out, var_out, entry_mean_out, entry_var_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "rla_update_and_entry_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      // The shared read: P = ws @ y per pixel, unrounded (each half rounds its own sum once).
      at::Tensor P = device_empty({N, Ce + k, H, W}, y.options()
                                                         .dtype(c10::CppTypeToScalarType<acc_t>::value)
                                                         .memory_format(format_of(CL)));
      if (CL) {
        at::Tensor P2 = rows_view(P);
        mm_into(P2, rows_view(y), ws.t());
      } else {
        at::Tensor P3 = planes_view(P);
        bmm_into(P3, ws.unsqueeze(0).expand({N, Ce + k, C}), planes_view(y));
      }
      std::tie(h_next, mean_out, var_out) = update_tail_forward<scalar_t, CL>(
          P.data_ptr<acc_t>(), Ce + k, Ce, s, h, pool, mean, var, gamma, beta, rec_weight, eps);
      const at::Tensor we_h = entry_weight.narrow(1, C, k);
      const int64_t kh = add_wide_h_part(P.narrow(1, 0, Ce), h_next, we_h, CL);
      ConcatZ<scalar_t, CL, acc_t> cz{P.data_ptr<acc_t>(), z.data_ptr<scalar_t>(), h_next.data_ptr<scalar_t>(),
                                      entry_weight.data_ptr<scalar_t>() + C, Ce, H * W, kh, C + k, Ce + k, 0};
      std::tie(entry_mean_out, entry_var_out) = entry_forward<scalar_t, CL>(cz, z, out, entry_mean, entry_var,
                                                                            entry_gamma, entry_beta, entry_eps, relu);
    });
  });
  return {h_next, s, mean_out, var_out, out, z, entry_mean_out, entry_var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rla_update_and_entry_bwd_cuda(const at::Tensor& grad_h_next, const at::Tensor& grad_out, const at::Tensor& h,
                              const at::Tensor& y, const at::Tensor& out_weight, const at::Tensor& gamma,
                              const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& s,
                              const at::Tensor& mean, const at::Tensor& var, const at::Tensor& h_next,
                              const at::Tensor& entry_weight, const at::Tensor& entry_gamma,
                              const at::Tensor& entry_beta, const at::Tensor& z, const at::Tensor& entry_mean,
                              const at::Tensor& entry_var, bool pool, double eps, double entry_eps, bool relu,
                              bool training) {
  const bool cl = is_channels_last(y);
  const UpdateGeometry g =
      check_inputs(h, y, out_weight, gamma, beta, rec_weight, entry_weight, entry_gamma, entry_beta, pool, cl);
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, k = g.k, Ce = entry_weight.size(0);
  check_saved("s", s, y, cl, k);
  check_saved("h_next", h_next, y, cl, k);
  check_saved("grad_h_next", grad_h_next, y, cl, k);
  const at::ScalarType sd = stat_dtype_for(y.scalar_type());
  check_stat_vector("mean", mean, k, sd, y);
  check_stat_vector("var", var, k, sd, y);
  const DeviceGuard guard(y.device());

  // The entry's BatchNorm + activation backward (checks z, grad_out and the entry statistics).
  auto [dz, dentry_gamma, dentry_beta] = entry_bn_act_backward(grad_out, z, y, entry_mean, entry_var, entry_gamma,
                                                               entry_beta, Ce, H, W, entry_eps, relu, training, cl);

  // The entry's h-columns: their weight gradient, and the gradient they send into h_next, which joins
  // the gradient h_next gets from its own consumers (rounded as autograd sums the two).
  const at::Tensor we_h = entry_weight.narrow(1, C, k);
  at::Tensor dentry_weight = device_empty_like(entry_weight);
  at::Tensor go_u = empty_act(y, N, k, H, W, cl);
  if (cl) {
    const at::Tensor dz2 = rows_view(dz);
    at::Tensor go2 = rows_view(go_u);
    at::Tensor dwh = dentry_weight.narrow(1, C, k);
    at::mm_out(go2, dz2, we_h);
    at::mm_out(dwh, dz2.t(), rows_view(h_next));
  } else {
    const at::Tensor dz3 = planes_view(dz);
    at::Tensor go3 = planes_view(go_u);
    at::bmm_out(go3, we_h.t().unsqueeze(0).expand({N, k, Ce}), dz3);
    dentry_weight.narrow(1, C, k).copy_(nchw_weight_grad(dz3, planes_view(h_next)));
  }
  go_u.add_(grad_h_next);

  // The update tail's backward, from h_next down to ds and dh.
  auto [ds, dh, drec, dgamma, dbeta] =
      update_tail_backward_pass(go_u, s, h, rec_weight, mean, var, gamma, beta, eps, pool, training, cl);

  // The shared read, backward: dP = [dz; ds] against the stacked weight, ONE dgrad GEMM into y and ONE
  // weight-gradient GEMM over y for both weights' y-columns.
  at::Tensor dP = empty_act(y, N, Ce + k, H, W, cl);
  dP.narrow(1, 0, Ce).copy_(dz);
  dP.narrow(1, Ce, k).copy_(ds);
  const at::Tensor ws = stacked_weight(out_weight, entry_weight, C);
  at::Tensor dy = empty_act(y, N, C, H, W, cl);
  at::Tensor dws;
  if (cl) {
    const at::Tensor dP2 = rows_view(dP);
    at::Tensor dy2 = rows_view(dy);
    at::mm_out(dy2, dP2, ws);
    dws = device_empty_like(ws);
    at::mm_out(dws, dP2.t(), rows_view(y));
  } else {
    const at::Tensor dP3 = planes_view(dP);
    at::Tensor dy3 = planes_view(dy);
    at::bmm_out(dy3, ws.t().unsqueeze(0).expand({N, C, Ce + k}), dP3);
    dws = nchw_weight_grad(dP3, planes_view(y));
  }
  dentry_weight.narrow(1, 0, C).copy_(dws.narrow(0, 0, Ce));
  at::Tensor dout_weight = device_empty_like(out_weight);
  dout_weight.copy_(dws.narrow(0, Ce, k));
  return {dh, dy, dout_weight, drec, dgamma, dbeta, dentry_weight, dentry_gamma, dentry_beta};
}

}  // namespace cuda
}  // namespace rla_ext
