// Helpers shared by the CPU kernels: the memory-format rule of the contract, argument checks that
// name the argument, and the 1x1-conv GEMMs on an activation in either memory format.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/batchnorm.h"
#include "cpu/isa.h"

namespace rla_ext::cpu {

// The contract's rule (same as rla_ext/ops/_validation.py: memory_format_of).
inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous;
}

inline ChannelLayout layout_of(const at::Tensor& t, at::MemoryFormat fmt) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), fmt == at::MemoryFormat::ChannelsLast};
}

inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " must be non-empty, got shape ", t.sizes());
}

inline void check_weight(const char* op, const char* name, const at::Tensor& w, at::IntArrayRef shape,
                         const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(w.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", w.device());
  TORCH_CHECK(w.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", w.scalar_type());
}

// gamma, beta, mean, var: 1-D, `channels` values, stat dtype.
inline void check_stat(const char* op, const char* name, const at::Tensor& t, int64_t channels,
                       at::ScalarType sd) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must be 1-D with ", channels,
              " values, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == sd, op, ": ", name, " must be in the statistics dtype ", sd,
              " (float64 for float64 activations, else float32), got ", t.scalar_type());
}

// (mean, var) for the forward: batch statistics when both are None (training), else checked
// copies of the given ones (eval). Copies, because a custom op must not return its inputs.
// A block entry's activations (op A and the basic block's 3x3 entry): x and h on one device and
// dtype, h's N, H, W those of x. The op checks its weight next, then check_entry_affine.
inline void check_entry_activations(const char* op, const at::Tensor& x, const at::Tensor& h) {
  check_activation(op, "x", x, x, "x");
  check_activation(op, "h", h, x, "x");
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(2) == x.size(2) && h.size(3) == x.size(3), op,
              ": h must be (N, k, H, W) with N, H, W of x ", x.sizes(), ", got ", h.sizes());
}

// A block entry's BatchNorm affine: gamma and beta with co values in the stat dtype of x.
inline void check_entry_affine(const char* op, const at::Tensor& gamma, const at::Tensor& beta, int64_t co,
                               const at::Tensor& x) {
  const auto sd = stat_dtype(x.scalar_type());
  check_stat(op, "gamma", gamma, co, sd);
  check_stat(op, "beta", beta, co, sd);
}

// A backward kernel's saved pre-BN tensor (`name`) and grad_out, both of shape `shape` and like
// `like` (device, dtype), and the statistics the forward normalised with (shape[1] values).
inline void check_backward_inputs(const char* op, const char* name, const at::Tensor& saved,
                                  const at::Tensor& grad_out, const at::Tensor& mean, const at::Tensor& var,
                                  const std::vector<int64_t>& shape, const at::Tensor& like, const char* like_name) {
  check_activation(op, name, saved, like, like_name);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", shape, ", got ",
              saved.sizes());
  check_activation(op, "grad_out", grad_out, like, like_name);
  TORCH_CHECK(grad_out.sizes() == saved.sizes(), op, ": grad_out must have shape ", saved.sizes(), ", got ",
              grad_out.sizes());
  const auto sd = stat_dtype(like.scalar_type());
  check_stat(op, "mean", mean, shape[1], sd);
  check_stat(op, "var", var, shape[1], sd);
}

struct StatInputs {
  at::Tensor mean, var;
  bool training;
};
inline StatInputs stat_inputs(const char* op, const c10::optional<at::Tensor>& mean,
                              const c10::optional<at::Tensor>& var, int64_t channels, at::ScalarType sd) {
  const bool has_mean = mean.has_value() && mean->defined();
  const bool has_var = var.has_value() && var->defined();
  TORCH_CHECK(has_mean == has_var, op, ": mean and var must be given together (eval) or both be None (training)");
  if (!has_mean) {
    auto opts = at::TensorOptions().dtype(sd);
    return {at::empty({channels}, opts), at::empty({channels}, opts), true};
  }
  check_stat(op, "mean", *mean, channels, sd);
  check_stat(op, "var", *var, channels, sd);
  return {mean->contiguous().clone(), var->contiguous().clone(), false};
}

// An activation as the GEMM sees it: channels_last as an (N*H*W, C) matrix, NCHW as (N, C, H*W).
inline at::Tensor pixel_matrix(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}
inline at::Tensor plane_batch(const at::Tensor& t) { return t.view({t.size(0), t.size(1), -1}); }

// out[n, :, p] (+)= w @ in[n, :, p] for every pixel p: a 1x1 conv, out and in in format `fmt`.
inline void conv1x1(at::Tensor& out, const at::Tensor& w, const at::Tensor& in, bool cl, bool accumulate) {
  if (cl) {
    at::Tensor o = pixel_matrix(out);
    o.addmm_(pixel_matrix(in), w.t(), accumulate ? 1 : 0);
    return;
  }
  at::Tensor o = plane_batch(out), i = plane_batch(in);
  for (int64_t n = 0; n < out.size(0); ++n) {
    at::Tensor on = o.select(0, n);
    on.addmm_(w, i.select(0, n), accumulate ? 1 : 0);
  }
}

// A fresh 1x1 conv output w @ in (w a (Cout, Cin) matrix, any strides). ATen's convolution goes to
// oneDNN on x86, which beats the BLAS GEMM on the many-pixel shapes (N=8, C=512, 28x28: 4.2 vs 5.8 ms
// for 128 outputs, 1.3 vs 2.5 ms for k = 32) and on few outputs; with fewer pixel rows than input
// channels and than 4x the outputs (the entry convs of the 7x7 stage) its channels_last kernel falls
// behind the GEMM on the pixel matrix (N=8, C=2048, Cout=512, 7x7: 5.6 vs 4.8 ms; N=2: 2.7 vs 1.5 ms).
// Measured on 2 cores (AVX-512, fp32, glibc keeping freed memory) over the four RLA-ResNet-50 stages at
// N=2 and 8, both ops' output widths: this rule picked the faster side or a tie (within 7%) everywhere;
// the previous one (rows < Cin alone) sent rla_update's k = 32 outputs at N=8, 7x7 to the GEMM, 0.33 vs
// 0.29 ms.
inline bool conv1x1_by_gemm(int64_t rows, int64_t cin, int64_t cout, bool cl) {
  return cl && rows < cin && rows < 4 * cout;
}
inline at::Tensor conv1x1_new(const at::Tensor& in, const at::Tensor& w, at::MemoryFormat fmt) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t rows = in.size(0) * in.size(2) * in.size(3);
  if (conv1x1_by_gemm(rows, w.size(1), w.size(0), cl)) {
    at::Tensor out = at::empty({in.size(0), w.size(0), in.size(2), in.size(3)}, in.options().memory_format(fmt));
    conv1x1(out, w, in, true, false);
    return out;
  }
  return at::conv2d(in, w.contiguous().view({w.size(0), w.size(1), 1, 1})).contiguous(fmt);
}

// Who computes a 1x1 conv's weight gradient: oneDNN's convolution backward (as eager PyTorch does),
// unless channels_last with fewer pixel rows than channels, where one GEMM over the pixel matrices
// wins. Measured on 2 cores (AVX-512, fp32, channels_last) over the RLA-ResNet-50 stage shapes of both
// ops at N = 2 and 8: with rows >= max(Cout, Cin) oneDNN was 1.0-1.7x faster than the GEMM (2.4 vs 4.1 ms
// at N=8, Cout=32, Cin=256, 56x56), below it the GEMM up to 2.3x (1.2 vs 2.7 ms at N=2, 512 x 2048, 7x7).
inline bool weight_grad_by_onednn(const at::Tensor& dout, const at::Tensor& in, bool cl) {
  const int64_t rows = in.size(0) * in.size(2) * in.size(3);
  return !cl || rows >= std::max(dout.size(1), in.size(1));
}

// dw (a (Cout, Cin) matrix, possibly a column slice of a wider one) = sum over pixels of
// dout[:, p] in[:, p]^T. Both routes are deterministic for a fixed thread count.
inline void conv1x1_weight_grad(at::Tensor dw, const at::Tensor& dout, const at::Tensor& in, bool cl) {
  if (weight_grad_by_onednn(dout, in, cl)) {
    // Only the weight's shape and dtype matter to the weight gradient. Not dw itself: as a column slice
    // of a wider gradient it is not contiguous, and oneDNN's path would copy it (0.1 ms at C=512).
    const at::Tensor w4 = at::empty({dw.size(0), dw.size(1), 1, 1}, dw.options());
    auto grads = at::convolution_backward(dout, in, w4, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                          {false, true, false});
    dw.copy_(std::get<1>(grads).view({dw.size(0), dw.size(1)}));
    return;
  }
  at::mm_out(dw, pixel_matrix(dout).t(), pixel_matrix(in));
}

// The weight gradient of a 1x1 conv as a fresh (Cout, Cin) matrix (w: the (Cout, Cin) weight).
inline at::Tensor conv1x1_weight_grad_new(const at::Tensor& dout, const at::Tensor& in, const at::Tensor& w,
                                          bool cl) {
  at::Tensor dw = at::empty({w.size(0), w.size(1)}, w.options());
  conv1x1_weight_grad(dw, dout, in, cl);
  return dw;
}

// The input gradient of a 1x1 conv: w^T @ dout per pixel, shaped like `in` (the conv's input; only its
// sizes and format are used) and returned in format `fmt`. Where the pixel rows are few against the
// input channels (rows <= 4 Cin: the 14x14 / 7x7 stages), oneDNN's convolution backward-data takes w as
// it is; elsewhere the input gradient is a 1x1 conv with the transposed weight, on conv1x1_new's route
// (for k = 32 inputs oneDNN beat addmm by 25%: 1.4 vs 2.0 ms at N=8, C=512, 28x28). The transposed route
// pays a transposed copy of w and oneDNN's reorder of it: measured on 2 cores (AVX-512, fp32, channels_last),
// the 7x7 entry's dx (N=8, C=2048, Cout=512) took 5.17 ms that way against 4.43 ms by backward-data
// (N=2: 2.14 vs 1.29), rla_update's dy (k=32) 0.53 vs 0.41 ms; at rows / Cin of 6 and above the
// transposed route was equal or up to 7% faster.
inline at::Tensor conv1x1_input_grad(const at::Tensor& dout, const at::Tensor& w, const at::Tensor& in,
                                     at::MemoryFormat fmt) {
  const int64_t rows = dout.size(0) * dout.size(2) * dout.size(3);
  if (rows > 4 * w.size(1)) return conv1x1_new(dout, w.t(), fmt);
  const at::Tensor w4 = w.contiguous().view({w.size(0), w.size(1), 1, 1});
  auto grads = at::convolution_backward(dout, in, w4, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                        {true, false, false});
  return std::get<0>(grads).contiguous(fmt);
}

// ---------------------------------------------------------------- the RLA state's 2x2 pooling
// (rla_update and rla_update_and_entry). Floor mode: rows / columns of h beyond 2H / 2W are dropped.

// Visits every 2x2 window of pooling `big` (N, k, Hb, Wb) down to (N, k, H, W): f(dst, src0..src3)
// with dst the linear offset in the small tensor and src* those of the window in the big one.
// Rows/columns of `big` beyond 2H / 2W (floor mode) are never visited.
template <typename F>
void for_each_window(const at::Tensor& big, const at::Tensor& small, bool cl, const F& f) {
  const int64_t N = small.size(0), K = small.size(1), H = small.size(2), W = small.size(3);
  const int64_t Hb = big.size(2), Wb = big.size(3);
  at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, i = r % H;
      isa_dispatch([&] {
        if (cl) {
          for (int64_t j = 0; j < W; ++j) {
            const int64_t dst = ((n * H + i) * W + j) * K;
            const int64_t s0 = ((n * Hb + 2 * i) * Wb + 2 * j) * K, s1 = s0 + K, s2 = s0 + Wb * K, s3 = s2 + K;
            for (int64_t c = 0; c < K; ++c) f(dst + c, s0 + c, s1 + c, s2 + c, s3 + c);
          }
        } else {
          for (int64_t c = 0; c < K; ++c) {
            const int64_t dst = ((n * K + c) * H + i) * W;
            const int64_t s0 = ((n * K + c) * Hb + 2 * i) * Wb;
            for (int64_t j = 0; j < W; ++j)
              f(dst + j, s0 + 2 * j, s0 + 2 * j + 1, s0 + Wb + 2 * j, s0 + Wb + 2 * j + 1);
          }
        }
      });
    }
  });
}

// s += pool?(h), in place (s and h in the same memory format; `cl` says which).
inline void add_state(at::Tensor& s, const at::Tensor& h, bool pool, bool cl) {
  if (!pool) {
    s.add_(h);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rla_add_pooled_state", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = h.const_data_ptr<scalar_t>();
    scalar_t* dst = s.data_ptr<scalar_t>();
    for_each_window(h, s, cl, [=](int64_t d, int64_t a, int64_t b, int64_t c, int64_t e) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) +
                                     acc_t(0.25) * (static_cast<acc_t>(src[a]) + static_cast<acc_t>(src[b]) +
                                                    static_cast<acc_t>(src[c]) + static_cast<acc_t>(src[e])));
    });
  });
}

// The gradient into h (shape of `h`, format `fmt`) given ds, the gradient at s = pool?(h) + ...
inline at::Tensor state_grad(const at::Tensor& ds, const at::Tensor& h, bool pool, at::MemoryFormat fmt) {
  if (!pool) return ds;
  at::Tensor dh = at::empty(h.sizes(), ds.options().memory_format(fmt)).zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ds.scalar_type(), "rla_unpool_state_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = ds.const_data_ptr<scalar_t>();
    scalar_t* dst = dh.data_ptr<scalar_t>();
    for_each_window(dh, ds, fmt == at::MemoryFormat::ChannelsLast,
                    [=](int64_t d, int64_t a0, int64_t a1, int64_t a2, int64_t a3) {
      const scalar_t q = static_cast<scalar_t>(acc_t(0.25) * static_cast<acc_t>(src[d]));
      dst[a0] = q;
      dst[a1] = q;
      dst[a2] = q;
      dst[a3] = q;
    });
  });
  return dh;
}

}  // namespace rla_ext::cpu
