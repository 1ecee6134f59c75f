// The 1x1 entry's z = round_T(zx + W[:, C:] @ h) and its BatchNorm + activation forward, shared by
// concat_conv_bn_act (op A, zx = W[:, :C] @ x from its own GEMM) and the block boundary (op C, zx =
// the first C_entry channels of the shared GEMM's output P). zx stays UNROUNDED in the accumulation
// dtype (float for half types) and z is rounded once, as a single GEMM over cat(x, h) would round it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "batchnorm.cuh"

namespace rla_ext {
namespace cuda {

// h-parts up to this many channels are added per element; wider ones by a GEMM in the accumulation dtype.
constexpr int64_t kMaxDirectH = 64;

// z = round_T(zx + weight[:, C:] @ h) per element. zx is channels [zx_c0, zx_c0 + Co) of a
// (N, zx_channels, H, W) acc_t tensor in z's format; it may be z itself (same buffer, zx_channels = Co,
// zx_c0 = 0) when acc_t is T: each element is read before it is written, by the same thread.
template <typename T, bool CL, typename acc_t>
struct ConcatZ {
  const acc_t* zx;
  T* z;
  const T* __restrict__ h;   // (N, kh, H, W)
  const T* __restrict__ wh;  // weight + C: the h columns of output channel c start at wh + c * ldw
  int64_t Co, HW, kh, ldw;   // kh = 0: the h-part is already in zx
  int64_t zx_channels, zx_c0;

  __device__ __forceinline__ T value(int64_t n, int64_t p, int64_t c) const {
    acc_t v = zx[act_offset<CL>(n, p, zx_c0 + c, zx_channels, HW)];
    const T* w = wh + c * ldw;
    for (int64_t j = 0; j < kh; ++j) {
      v += static_cast<acc_t>(w[j]) * static_cast<acc_t>(h[act_offset<CL>(n, p, j, kh, HW)]);
    }
    return static_cast<T>(v);
  }

  // As a statistics producer (training): the statistics see exactly the stored z.
  __device__ __forceinline__ void operator()(WelfordState<acc_t>& st, int64_t n, int64_t p, int64_t c) const {
    const T r = value(n, p, c);
    z[act_offset<CL>(n, p, c, Co, HW)] = r;
    st.push(static_cast<acc_t>(r));
  }

  // As an elementwise pass (eval).
  __device__ __forceinline__ void store(int64_t n, int64_t p, int64_t c, int64_t off) const {
    z[off] = value(n, p, c);
  }
};

// zx += wh @ h when h is too wide for the per-element sum (k > kMaxDirectH), in zx's dtype; zx is an
// (N, Co, H, W) activation of format cl or a channel slice of one. Returns how many h channels
// ConcatZ must still add (0 or k).
inline int64_t add_wide_h_part(at::Tensor zx, const at::Tensor& h, const at::Tensor& wh, bool cl) {
  const int64_t N = h.size(0), k = h.size(1), Co = wh.size(0);
  if (k <= kMaxDirectH) return k;
  const at::ScalarType acc = zx.scalar_type();
  if (cl) {
    // rows_view of a channel slice is still a view: its pixels keep one stride.
    at::Tensor zx2 = zx.permute({0, 2, 3, 1}).view({N * h.size(2) * h.size(3), Co});
    zx2.addmm_(rows_view(h).to(acc), wh.t().to(acc));
  } else {
    at::Tensor zx3 = zx.view({N, Co, h.size(2) * h.size(3)});
    zx3.baddbmm_(wh.unsqueeze(0).expand({N, Co, k}).to(acc), planes_view(h).to(acc));
  }
  return 0;
}

// Runs `cz` into z (statistics and the BatchNorm parameters in training, the given statistics in eval),
// then out = act(bn(z)); returns (mean, var). Called inside the dtype and layout dispatch.
template <typename T, bool CL>
std::tuple<at::Tensor, at::Tensor> entry_forward(const ConcatZ<T, CL, at::opmath_type<T>>& cz, at::Tensor& z,
                                                 at::Tensor& out, const std::optional<at::Tensor>& mean,
                                                 const std::optional<at::Tensor>& var, const at::Tensor& gamma,
                                                 const at::Tensor& beta, double eps, bool relu) {
  using acc_t = at::opmath_type<T>;
  at::Tensor mean_out, var_out, params;
  std::tie(mean_out, var_out, params) = batch_or_given_stats<CL, acc_t, true>(
      cz, z.size(0), z.size(1), z.size(2) * z.size(3), mean, var, gamma, beta, eps);
  with_act(relu, [&](auto act) { launch_bn_act<T, CL, decltype(act)>(z, out, params); });
  return {mean_out, var_out};
}

}  // namespace cuda
}  // namespace rla_ext
