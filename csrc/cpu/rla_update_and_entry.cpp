// The block boundary on CPU: the RLA update of step t and the next block's entry, sharing the read of
// the block output y. Contract: docs/ARCHITECTURE.md ("Op C").
//
//   P = [W_entry[:, :C] ; W_out] @ y            ONE GEMM over y, (Ce + k) output channels
//   s = pool?(h) + P[Ce:]                        then rla_update's remainder:
//   h_next = conv3x3(tanh(bn_u(s)), rec_weight)
//   z = P[:Ce] + W_entry[:, C:] @ h_next         then concat_conv_bn_act's remainder:
//   out = act(bn_e(z))
//
// Backward mirrors it: dz (entry BN backward) gives the entry's share of dh_next (W_entry[:, C:]^T dz),
// which joins grad_h_next on the way back through the update to ds; the gradient into y from both
// consumers is then ONE dgrad GEMM with the stacked weight over dP = [dz ; ds], and both weights'
// y-columns come from ONE weight-gradient pass over y. The BatchNorm passes and the pooling are the
// same helpers the two single ops use (cpu/batchnorm.h, cpu/common.h).
// Where the GEMMs are compute-bound and the weights large (channels_last, fewer pixel rows than C: the
// 14x14 / 7x7 stages at small batch) the GEMMs run per weight instead (shared_gemm, per_weight_gemms).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "cpu/batchnorm.h"
#include "cpu/bn_act.h"
#include "cpu/common.h"
#include "cpu/update_tail.h"

namespace rla_ext::cpu {
namespace {

constexpr const char* kOp = "rla_update_and_entry";

void check_inputs(const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight, const at::Tensor& gamma,
                  const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& entry_weight,
                  const at::Tensor& entry_gamma, const at::Tensor& entry_beta, bool pool) {
  check_activation(kOp, "y", y, y, "y");
  check_activation(kOp, "h", h, y, "y");
  const int64_t k = h.size(1), C = y.size(1);
  const int64_t hh = pool ? h.size(2) / 2 : h.size(2), hw = pool ? h.size(3) / 2 : h.size(3);
  TORCH_CHECK(h.size(0) == y.size(0) && hh == y.size(2) && hw == y.size(3), kOp, ": h ", h.sizes(),
              " does not match y ", y.sizes(), pool ? " (with pool, h's H, W halved (floor) must equal y's)"
                                                    : " (N, H, W must be equal)");
  check_weight(kOp, "out_weight", out_weight, {k, C}, y, "y");
  check_weight(kOp, "rec_weight", rec_weight, {k, k, 3, 3}, y, "y");
  TORCH_CHECK(entry_weight.dim() == 2, kOp, ": entry_weight must be a 2-D (C_entry, C + k) matrix, got shape ",
              entry_weight.sizes());
  check_weight(kOp, "entry_weight", entry_weight, {entry_weight.size(0), C + k}, y, "y");
  const auto sd = stat_dtype(y.scalar_type());
  check_stat(kOp, "gamma", gamma, k, sd);
  check_stat(kOp, "beta", beta, k, sd);
  check_stat(kOp, "entry_gamma", entry_gamma, entry_weight.size(0), sd);
  check_stat(kOp, "entry_beta", entry_beta, entry_weight.size(0), sd);
}

// [entry_weight[:, :C] ; out_weight]: the (Ce + k, C) weight of the one GEMM over y.
at::Tensor stacked_weight(const at::Tensor& out_weight, const at::Tensor& entry_weight, int64_t C) {
  const int64_t Ce = entry_weight.size(0), k = out_weight.size(0);
  at::Tensor ws = at::empty({Ce + k, C}, out_weight.options());
  ws.narrow(0, 0, Ce).copy_(entry_weight.narrow(1, 0, C));
  ws.narrow(0, Ce, k).copy_(out_weight);
  return ws;
}

// The shared read of y: (zx, o) = (entry_weight[:, :C] @ y, out_weight @ y) per pixel, fresh tensors
// in format `fmt`. One GEMM with the stacked weight (oneDNN's convolution, C <= pixel rows: the weight is
// small) or, where pixel rows are fewer than C (channels_last), one 1x1 conv per weight as it is
// (conv1x1_new, which picks the GEMM or oneDNN for each): there the stacked copy cost 0.4 ms (1.2 ms as
// a cat) of a 5.6 ms forward at the 7x7 stage (N=8, C=2048, Ce=512: a 4.4 MB weight), and GEMMs into
// P's column blocks ran 7% slower than into their own outputs; the GEMMs are compute-bound there, so
// reading y twice costs nothing measurable.
bool per_weight_gemms(const at::Tensor& y, at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::ChannelsLast && y.size(0) * y.size(2) * y.size(3) < y.size(1);
}

std::pair<at::Tensor, at::Tensor> shared_gemm(const at::Tensor& y, const at::Tensor& out_weight,
                                              const at::Tensor& we, at::MemoryFormat fmt) {
  const int64_t C = y.size(1), Ce = we.size(0), k = out_weight.size(0);
  if (per_weight_gemms(y, fmt)) {
    return {conv1x1_new(y, we.narrow(1, 0, C), fmt), conv1x1_new(y, out_weight, fmt)};
  }
  const at::Tensor P = conv1x1_new(y, stacked_weight(out_weight, we, C), fmt);
  return {P.narrow(1, 0, Ce).contiguous(fmt), P.narrow(1, Ce, k).contiguous(fmt)};
}

// Returns (h_next, s, mean, var, out, z, entry_mean, entry_var): h_next and s as rla_update's kernel
// returns out and s, out and z as concat_conv_bn_act's kernel returns them for x = y, h = h_next.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& h_in, const at::Tensor& y_in, const at::Tensor& out_weight, const at::Tensor& gamma,
    const at::Tensor& beta, const c10::optional<at::Tensor>& mean_in, const c10::optional<at::Tensor>& var_in,
    const at::Tensor& rec_weight, const at::Tensor& entry_weight, const at::Tensor& entry_gamma,
    const at::Tensor& entry_beta, const c10::optional<at::Tensor>& entry_mean_in,
    const c10::optional<at::Tensor>& entry_var_in, bool pool, double eps, double entry_eps, bool relu) {
  check_inputs(h_in, y_in, out_weight, gamma, beta, rec_weight, entry_weight, entry_gamma, entry_beta, pool);
  const auto fmt = memory_format_of(y_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor h = h_in.contiguous(fmt), y = y_in.contiguous(fmt), we = entry_weight.contiguous();
  const int64_t C = y.size(1), k = h.size(1), Ce = we.size(0);
  const auto sd = stat_dtype(y.scalar_type());

  // The shared read of y (shared_gemm): the entry's x-part z (h_next's part is added below) and o.
  auto [z, s] = shared_gemm(y, out_weight.contiguous(), we, fmt);

  // The update: s = o + pool?(h), BatchNorm + tanh, the 3x3 recurrent conv.
  add_state(s, h, pool, cl);
  StatInputs st = stat_inputs(kOp, mean_in, var_in, k, sd);
  at::Tensor h_next = update_tail_forward(s, st, rec_weight, gamma, beta, eps, fmt);

  // The entry: z = zx + W_entry_h @ h_next, BatchNorm + activation.
  conv1x1(z, we.narrow(1, C, k), h_next, cl, true);
  StatInputs se = stat_inputs(kOp, entry_mean_in, entry_var_in, Ce, sd);
  at::Tensor out = bn_act_forward(z, se, entry_gamma, entry_beta, entry_eps, relu, fmt);
  return {h_next, s, st.mean, st.var, out, z, se.mean, se.var};
}

void check_saved(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const at::Tensor& y) {
  check_activation(kOp, name, t, y, "y");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Returns (dh, dy, dout_weight, drec_weight, dgamma, dbeta, dentry_weight, dentry_gamma, dentry_beta).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward(const at::Tensor& grad_h_next, const at::Tensor& grad_out, const at::Tensor& h_in, const at::Tensor& y_in,
         const at::Tensor& out_weight, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rec_weight,
         const at::Tensor& s_in, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& h_next_in,
         const at::Tensor& entry_weight, const at::Tensor& entry_gamma, const at::Tensor& entry_beta,
         const at::Tensor& z_in, const at::Tensor& entry_mean, const at::Tensor& entry_var, bool pool, double eps,
         double entry_eps, bool relu, bool training) {
  check_inputs(h_in, y_in, out_weight, gamma, beta, rec_weight, entry_weight, entry_gamma, entry_beta, pool);
  const int64_t N = y_in.size(0), C = y_in.size(1), k = h_in.size(1), Ce = entry_weight.size(0);
  const int64_t H = y_in.size(2), W = y_in.size(3);
  check_saved(s_in, "s", {N, k, H, W}, y_in);
  check_saved(h_next_in, "h_next", {N, k, H, W}, y_in);
  check_saved(grad_h_next, "grad_h_next", {N, k, H, W}, y_in);
  check_saved(z_in, "z", {N, Ce, H, W}, y_in);
  check_saved(grad_out, "grad_out", {N, Ce, H, W}, y_in);
  const auto sd = stat_dtype(y_in.scalar_type());
  check_stat(kOp, "mean", mean, k, sd);
  check_stat(kOp, "var", var, k, sd);
  check_stat(kOp, "entry_mean", entry_mean, Ce, sd);
  check_stat(kOp, "entry_var", entry_var, Ce, sd);

  const auto fmt = memory_format_of(y_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor y = y_in.contiguous(fmt), we = entry_weight.contiguous(), wr = rec_weight.contiguous();
  const at::Tensor s = s_in.contiguous(fmt), z = z_in.contiguous(fmt), h_next = h_next_in.contiguous(fmt);
  const at::Tensor go = grad_out.contiguous(fmt);

  // The entry's BatchNorm + activation backward: dz, dentry_gamma, dentry_beta.
  auto [dz, dgamma_e, dbeta_e] =
      bn_act_backward_pass(go, z, entry_mean, entry_var, entry_gamma, entry_beta, entry_eps, relu, training, fmt);
  // The entry's h-columns: their weight gradient, and the gradient they send into h_next, which joins
  // the gradient h_next gets from its own consumers.
  const at::Tensor we_h = we.narrow(1, C, k);
  at::Tensor dwe = at::empty({Ce, C + k}, we.options());
  conv1x1_weight_grad(dwe.narrow(1, C, k), dz, h_next, cl);
  at::Tensor go_u = conv1x1_input_grad(dz, we_h, h_next, fmt);
  go_u.add_(grad_h_next.contiguous(fmt));

  // The update's backward from h_next to s, as rla_update's kernel.
  auto [ds, drec, dgamma, dbeta] = update_tail_backward(go_u, s, wr, mean, var, gamma, beta, eps, training, fmt);

  // The shared read, backward, on the forward's route (shared_gemm). Stacked: dP = [dz ; ds] against the
  // stacked weight, one dgrad GEMM gives dy from both consumers and one weight-gradient pass over y both
  // weights' y-columns. Per weight (the small stages): each weight's dgrad and weight gradient as the
  // two single ops compute them (the stacked weight and dP copies measured ~1.9 ms slower there, at
  // N=8, C=2048, Ce=512), dy summed as autograd sums the two ops' gradients.
  const at::Tensor wo = out_weight.contiguous();
  at::Tensor dy, dw_out;
  if (per_weight_gemms(y, fmt)) {
    dy = conv1x1_input_grad(dz, we.narrow(1, 0, C), y, fmt);
    dy.add_(conv1x1_input_grad(ds, wo, y, fmt));
    conv1x1_weight_grad(dwe.narrow(1, 0, C), dz, y, cl);
    dw_out = conv1x1_weight_grad_new(ds, y, wo, cl);
  } else {
    const at::Tensor dP = at::cat({dz, ds}, 1).contiguous(fmt);
    const at::Tensor ws = stacked_weight(wo, we, C);
    dy = conv1x1_input_grad(dP, ws, y, fmt);
    at::Tensor dws = conv1x1_weight_grad_new(dP, y, ws, cl);
    dwe.narrow(1, 0, C).copy_(dws.narrow(0, 0, Ce));
    dw_out = dws.narrow(0, Ce, k).clone();  // its own storage, as the fake kernel promises
  }
  at::Tensor dh = state_grad(ds, h_in, pool, fmt);
  return {dh, dy, dw_out, drec, dgamma, dbeta, dwe, dgamma_e, dbeta_e};
}

}  // namespace

TORCH_LIBRARY_IMPL(rla_ext, CPU, m) {
  m.impl("rla_update_and_entry_kernel_fwd", &forward);
  m.impl("rla_update_and_entry_kernel_bwd", &backward);
}

}  // namespace rla_ext::cpu
