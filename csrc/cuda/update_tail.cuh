// The update's tail, shared by rla_update (op B) and the block boundary (op C): s = pool?(h) + t with the
// BatchNorm statistics, then h_next = conv3x3(tanh(bn(s))), and its backward from the gradient at h_next
// down to ds and dh. Each op computes t (= out_weight @ y) with its own GEMM before calling in.
//
// Forward: one reduction kernel writes s = pool(h) + t while accumulating the BatchNorm partials; the
// normalise+tanh is fused into the loads of a direct 3x3 convolution (k <= 64), so a = tanh(bn(s))
// never reaches global memory. Backward recomputes a from s (never atanh of anything) and mirrors
// the forward: the same direct kernel with transposed, flipped weights gives the gradient at a.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "batchnorm.cuh"

namespace rla_ext {
namespace cuda {

// ---------------------------------------------------------------------------------------------------
// s = avgpool2x2?(h) + t, in place over t.
// ---------------------------------------------------------------------------------------------------

// `t` is channels [t_c0, t_c0 + C) of a (N, t_channels, H, W) tensor in s's format: rla_update's GEMM
// output (T, the buffer s itself, t_c0 = 0) or the boundary's shared GEMM output P (acc_t, unrounded,
// t_c0 = C_entry). s and t may be the same buffer: each element is read before it is written, by the
// same thread, hence no __restrict__ on either.
template <typename T, bool CL, typename acc_t, typename Src = T>
struct PoolAdd {
  T* s;
  const Src* t;
  int64_t t_channels, t_c0;
  const T* __restrict__ h;  // (N, C, Hh, Wh)
  int64_t C, HW, W;         // geometry of s
  int64_t HWh, Wh;          // geometry of h
  bool pool;

  // Sum computed in acc_t and rounded to T once; the statistics then see exactly the stored s.
  __device__ __forceinline__ T value(int64_t n, int64_t p, int64_t c) const {
    acc_t hv;
    if (pool) {
      const int64_t y = p / W;
      const int64_t x = p - y * W;
      const int64_t q = 2 * y * Wh + 2 * x;  // floor mode: rows/cols beyond 2H/2W are never read
      hv = (static_cast<acc_t>(h[act_offset<CL>(n, q, c, C, HWh)]) +
            static_cast<acc_t>(h[act_offset<CL>(n, q + 1, c, C, HWh)]) +
            static_cast<acc_t>(h[act_offset<CL>(n, q + Wh, c, C, HWh)]) +
            static_cast<acc_t>(h[act_offset<CL>(n, q + Wh + 1, c, C, HWh)])) *
           acc_t(0.25);
    } else {
      hv = static_cast<acc_t>(h[act_offset<CL>(n, p, c, C, HW)]);
    }
    return static_cast<T>(static_cast<acc_t>(t[act_offset<CL>(n, p, t_c0 + c, t_channels, HW)]) + hv);
  }

  // As a statistics producer (training).
  __device__ __forceinline__ void operator()(WelfordState<acc_t>& st, int64_t n, int64_t p, int64_t c) const {
    const T r = value(n, p, c);
    s[act_offset<CL>(n, p, c, C, HW)] = r;
    st.push(static_cast<acc_t>(r));
  }

  // As an elementwise pass (eval): the same sum without statistics.
  __device__ __forceinline__ void store(int64_t n, int64_t p, int64_t c, int64_t off) const {
    s[off] = value(n, p, c);
  }
};

// dh from ds: a quarter of ds to each of the 2x2 inputs of a pooled pixel, zero beyond 2H/2W. An
// elementwise pass over dh (launch_pointwise decodes each element's image n, pixel q of h, channel c).
template <typename T, bool CL>
struct PoolBackward {
  using acc_t = at::opmath_type<T>;
  const T* __restrict__ ds;  // (N, C, H, W)
  T* __restrict__ dh;        // (N, C, Hh, Wh)
  int64_t C, H, W, Wh;

  __device__ __forceinline__ void store(int64_t n, int64_t q, int64_t c, int64_t off) const {
    const int64_t Y = q / Wh;
    const int64_t X = q - Y * Wh;
    acc_t v = 0;
    if (Y < 2 * H && X < 2 * W) {
      v = static_cast<acc_t>(ds[act_offset<CL>(n, (Y / 2) * W + X / 2, c, C, H * W)]) * acc_t(0.25);
    }
    dh[off] = static_cast<T>(v);
  }
};

// ---------------------------------------------------------------------------------------------------
// Direct 3x3 convolution (padding 1, stride 1) for k <= 64 channels in and out.
// A block computes a TILE_H x TILE_W pixel tile of one image for all output channels; each thread
// owns one pixel and OCPT consecutive output channels (threads = pixels x channel groups). Input
// channels are processed in chunks of `icc`: the chunk's (TILE_H+2) x (TILE_W+2) halo tile, already
// transformed by `In` (e.g. tanh(bn(s))) and zero outside the image, and its weights go to shared
// memory as acc_t. Weights are stored [ic][tap][oc] so a thread's OCPT weights are contiguous and a
// warp (same channel group) reads them as a broadcast.
// TRANSPOSE computes the gradient w.r.t. the input instead: weights W[ic][oc][2-dy][2-dx].
// ---------------------------------------------------------------------------------------------------

constexpr int kOcPerThread = 8;
constexpr int kTileW = 8;
constexpr int kMaxDirectK = 64;
constexpr int kConvThreadsTarget = 256;

struct ConvPlan {
  int groups, tile_h, threads, icc;
  int64_t tiles_w, tiles_per_image;
  size_t smem;
};

inline ConvPlan make_conv_plan(int64_t k, int64_t H, int64_t W, size_t acc_size) {
  ConvPlan p;
  p.groups = static_cast<int>(ceil_div(k, kOcPerThread));
  const int pixels = kConvThreadsTarget / p.groups;
  p.tile_h = std::max(1, pixels / kTileW);
  p.threads = p.tile_h * kTileW * p.groups;
  // Keeps shared memory under the 48 KiB every GPU grants without opt-in (double needs half the chunk).
  p.icc = acc_size >= 8 ? 8 : 16;
  p.tiles_w = ceil_div(W, kTileW);
  p.tiles_per_image = p.tiles_w * ceil_div(H, p.tile_h);
  p.smem = (static_cast<size_t>(p.icc) * 9 * p.groups * kOcPerThread +
            static_cast<size_t>(p.icc) * (p.tile_h + 2) * (kTileW + 2)) *
           acc_size;
  return p;
}

template <typename T, bool CL, typename acc_t>
struct ConvInBnTanh {
  const T* __restrict__ s;
  BnParams<acc_t> bp;
  int64_t C, HW;
  __device__ __forceinline__ acc_t operator()(int64_t n, int64_t c, int64_t p) const {
    return stable_tanh(bp.bn(static_cast<acc_t>(s[act_offset<CL>(n, p, c, C, HW)]), c));
  }
};

template <typename T, bool CL, typename acc_t>
struct ConvInPlain {
  const T* __restrict__ g;
  int64_t C, HW;
  __device__ __forceinline__ acc_t operator()(int64_t n, int64_t c, int64_t p) const {
    return static_cast<acc_t>(g[act_offset<CL>(n, p, c, C, HW)]);
  }
};

template <typename T, typename acc_t, bool CL, bool TRANSPOSE, typename In>
__global__ void conv3x3_direct_kernel(In in, const T* __restrict__ weight, T* __restrict__ out, int k, int64_t H,
                                      int64_t W, int tile_h, int groups, int icc, int64_t tiles_w,
                                      int64_t tiles_per_image) {
  RLA_SHARED(extern, unsigned char, smem_raw, []);
  const int koc = groups * kOcPerThread;
  acc_t* w_s = reinterpret_cast<acc_t*>(smem_raw);  // [icc][9][koc]
  acc_t* t_s = w_s + icc * 9 * koc;                 // [icc][tile_h + 2][kTileW + 2]
  const int th2 = tile_h + 2;
  constexpr int tw2 = kTileW + 2;

  const int tid = threadIdx.x;
  const int pixels = tile_h * kTileW;
  const int pix = tid % pixels;
  const int g = tid / pixels;
  const int py = pix / kTileW;
  const int px = pix % kTileW;
  const int64_t b = blockIdx.x;
  const int64_t n = b / tiles_per_image;
  const int64_t tile = b % tiles_per_image;
  const int64_t y0 = (tile / tiles_w) * tile_h;
  const int64_t x0 = (tile % tiles_w) * kTileW;
  const int64_t HW = H * W;

  acc_t acc[kOcPerThread];
#pragma unroll
  for (int j = 0; j < kOcPerThread; ++j) acc[j] = acc_t(0);

  for (int ic0 = 0; ic0 < k; ic0 += icc) {
    __syncthreads();  // the previous chunk's shared tiles are no longer read
    const int wn = icc * 9 * koc;
    for (int e = tid; e < wn; e += blockDim.x) {
      const int oc = e % koc;
      const int t = (e / koc) % 9;
      const int ci = ic0 + e / (koc * 9);
      acc_t v = acc_t(0);
      if (oc < k && ci < k) {
        v = TRANSPOSE ? static_cast<acc_t>(weight[(static_cast<int64_t>(ci) * k + oc) * 9 + (8 - t)])
                      : static_cast<acc_t>(weight[(static_cast<int64_t>(oc) * k + ci) * 9 + t]);
      }
      w_s[e] = v;
    }
    const int tn = icc * th2 * tw2;
    for (int e = tid; e < tn; e += blockDim.x) {
      // Fastest index along the contiguous dimension of the global tensor, for coalesced loads.
      int ic, yy, xx;
      if (CL) {
        ic = e % icc;
        const int r = e / icc;
        xx = r % tw2;
        yy = r / tw2;
      } else {
        xx = e % tw2;
        const int r = e / tw2;
        yy = r % th2;
        ic = r / th2;
      }
      const int ci = ic0 + ic;
      const int64_t gy = y0 - 1 + yy;
      const int64_t gx = x0 - 1 + xx;
      acc_t v = acc_t(0);  // zero padding applies to the conv input, i.e. after tanh(bn(.))
      if (ci < k && gy >= 0 && gy < H && gx >= 0 && gx < W) v = in(n, ci, gy * W + gx);
      t_s[(ic * th2 + yy) * tw2 + xx] = v;
    }
    __syncthreads();
    const int icn = min(icc, k - ic0);
    for (int ic = 0; ic < icn; ++ic) {
      const acc_t* tp = t_s + (ic * th2 + py) * tw2 + px;
      const acc_t* wp = w_s + ic * 9 * koc + g * kOcPerThread;
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        const acc_t v = tp[(t / 3) * tw2 + (t % 3)];
#pragma unroll
        for (int j = 0; j < kOcPerThread; ++j) acc[j] += wp[t * koc + j] * v;
      }
    }
  }

  const int64_t y = y0 + py;
  const int64_t x = x0 + px;
  if (y < H && x < W) {
#pragma unroll
    for (int j = 0; j < kOcPerThread; ++j) {
      const int oc = g * kOcPerThread + j;
      if (oc < k) out[act_offset<CL>(n, y * W + x, oc, k, HW)] = static_cast<T>(acc[j]);
    }
  }
}

template <typename T, bool CL, bool TRANSPOSE, typename In>
void launch_conv3x3_direct(const In& in, const at::Tensor& weight, at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = out.size(0), k = out.size(1), H = out.size(2), W = out.size(3);
  TORCH_CHECK(k <= kMaxDirectK, "rla_ext: direct 3x3 kernel supports k <= ", kMaxDirectK, ", got ", k);
  const ConvPlan p = make_conv_plan(k, H, W, sizeof(acc_t));
  const int64_t blocks = N * p.tiles_per_image;
  TORCH_CHECK(blocks <= INT32_MAX, "rla_ext: too many tiles for one grid (", blocks, ")");
  if (blocks == 0) return;  // an empty batch: nothing to compute, and an empty grid is a launch error
  launch<conv3x3_direct_kernel<T, acc_t, CL, TRANSPOSE, In>>(
      static_cast<unsigned>(blocks), p.threads, p.smem, in, weight.data_ptr<T>(), out.data_ptr<T>(),
      static_cast<int>(k), H, W, p.tile_h, p.groups, p.icc, p.tiles_w, p.tiles_per_image);
}

// ---------------------------------------------------------------------------------------------------
// Host side: the checks of the update's arguments and the tail's forward and backward.
// ---------------------------------------------------------------------------------------------------

struct UpdateGeometry {
  int64_t N, C, H, W, k, Hh, Wh;
};

// h against y (pooled or not), out_weight (k, C), rec_weight (k, k, 3, 3), gamma, beta (k).
inline UpdateGeometry check_update_inputs(const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight,
                                          const at::Tensor& gamma, const at::Tensor& beta,
                                          const at::Tensor& rec_weight, bool pool, bool cl) {
  TORCH_CHECK(is_device_tensor(y), "y: expected a CUDA tensor");
  TORCH_CHECK(y.dim() == 4, "y: expected a 4-D tensor, got ", y.sizes());
  check_format("y", y, cl);
  check_act("h", h, y, cl);
  UpdateGeometry g{y.size(0), y.size(1), y.size(2), y.size(3), h.size(1), h.size(2), h.size(3)};
  const int64_t eh = pool ? g.Hh / 2 : g.Hh;
  const int64_t ew = pool ? g.Wh / 2 : g.Wh;
  TORCH_CHECK(h.size(0) == g.N && eh == g.H && ew == g.W, "h: shape ", h.sizes(), " does not match y ",
              y.sizes(), pool ? " after 2x2 pooling" : "");
  TORCH_CHECK(out_weight.dim() == 2 && out_weight.size(0) == g.k && out_weight.size(1) == g.C &&
                  out_weight.is_contiguous() && out_weight.scalar_type() == y.scalar_type() &&
                  out_weight.device() == y.device(),
              "out_weight: expected a contiguous (k, C) matrix of y's dtype and device, got ", out_weight.sizes());
  TORCH_CHECK(rec_weight.dim() == 4 && rec_weight.size(0) == g.k && rec_weight.size(1) == g.k &&
                  rec_weight.size(2) == 3 && rec_weight.size(3) == 3 && rec_weight.is_contiguous() &&
                  rec_weight.scalar_type() == y.scalar_type() && rec_weight.device() == y.device(),
              "rec_weight: expected a contiguous (k, k, 3, 3) tensor of y's dtype and device, got ",
              rec_weight.sizes());
  const at::ScalarType sd = stat_dtype_for(y.scalar_type());
  check_stat_vector("gamma", gamma, g.k, sd, y);
  check_stat_vector("beta", beta, g.k, sd, y);
  return g;
}

// Given eval statistics are checked; training has neither.
inline void check_update_stats(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, int64_t k,
                               const at::Tensor& y) {
  TORCH_CHECK(mean.has_value() == var.has_value(), "mean, var: give both or neither");
  if (mean.has_value()) {
    const at::ScalarType sd = stat_dtype_for(y.scalar_type());
    check_stat_vector("mean", *mean, k, sd, y);
    check_stat_vector("var", *var, k, sd, y);
  }
}

// Writes s = pool?(h) + t (t: see PoolAdd) and returns (h_next, mean, var): batch statistics when
// `mean` is empty (training), copies of the given ones otherwise. Called inside the dtype and layout
// dispatch, with the device guard held.
template <typename T, bool CL, typename Src>
std::tuple<at::Tensor, at::Tensor, at::Tensor> update_tail_forward(
    const Src* t, int64_t t_channels, int64_t t_c0, at::Tensor& s, const at::Tensor& h, bool pool,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& rec_weight, double eps) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = s.size(0), k = s.size(1), H = s.size(2), W = s.size(3), HW = H * W;
  at::Tensor out = device_empty_like(s);
  PoolAdd<T, CL, acc_t, Src> pa{s.data_ptr<T>(), t, t_channels, t_c0, h.data_ptr<T>(), k, HW, W,
                                h.size(2) * h.size(3), h.size(3), pool};
  at::Tensor mean_out, var_out, params;
  std::tie(mean_out, var_out, params) =
      batch_or_given_stats<CL, acc_t, true>(pa, N, k, HW, mean, var, gamma, beta, eps);
  if (k <= kMaxDirectK) {
    ConvInBnTanh<T, CL, acc_t> in{s.data_ptr<T>(), BnParams<acc_t>{params.data_ptr<acc_t>(), k}, k, HW};
    launch_conv3x3_direct<T, CL, false>(in, rec_weight, out);
  } else {
    at::Tensor a = device_empty_like(s);
    launch_bn_act<T, CL, ActTanh>(s, a, params);
    out = at::conv2d(a, rec_weight, {}, 1, 1).contiguous(format_of(CL));
  }
  return {out, mean_out, var_out};
}

// From the gradient at h_next `grad_out` back to (ds, dh, drec_weight); writes dgamma, dbeta. `params`
// from bn_params_from_stats of the saved statistics. Called inside the dtype and layout dispatch.
template <typename T, bool CL>
std::tuple<at::Tensor, at::Tensor, at::Tensor> update_tail_backward(const at::Tensor& grad_out, const at::Tensor& s,
                                                                    const at::Tensor& h,
                                                                    const at::Tensor& rec_weight,
                                                                    const at::Tensor& params, at::Tensor& dgamma,
                                                                    at::Tensor& dbeta, bool pool, bool training) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = s.size(0), k = s.size(1), H = s.size(2), W = s.size(3);
  // a = tanh(bn(s)) recomputed: the weight gradient of the 3x3 conv needs it materialised.
  at::Tensor a = device_empty_like(s);
  launch_bn_act<T, CL, ActTanh>(s, a, params);
  at::Tensor ga, drec;
  if (k <= kMaxDirectK) {
    ga = device_empty_like(s);
    ConvInPlain<T, CL, acc_t> in{grad_out.data_ptr<T>(), k, H * W};
    launch_conv3x3_direct<T, CL, true>(in, rec_weight, ga);
    drec = std::get<1>(at::convolution_backward(grad_out, a, rec_weight, std::nullopt, {1, 1}, {1, 1}, {1, 1},
                                                false, {0, 0}, 1, {false, true, false}));
  } else {
    auto grads = at::convolution_backward(grad_out, a, rec_weight, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false,
                                          {0, 0}, 1, {true, true, false});
    ga = std::get<0>(grads).contiguous(format_of(CL));
    drec = std::get<1>(grads);
  }
  at::Tensor ds = bn_act_backward<T, CL, ActTanh>(ga, s, params, dgamma, dbeta, training);
  at::Tensor dh;
  if (pool) {
    const int64_t Hh = h.size(2), Wh = h.size(3);
    dh = empty_act(h, N, k, Hh, Wh, CL);
    if (dh.numel() > 0) {
      launch_pointwise<CL>(PoolBackward<T, CL>{ds.data_ptr<T>(), dh.data_ptr<T>(), k, H, W, Wh}, dh.numel(), k,
                           Hh * Wh);
    }
  } else {
    dh = ds;  // d(s)/d(h) is the identity without pooling; ds is a fresh tensor, so no aliasing
  }
  return {ds, dh, drec.contiguous()};
}

// The update tail's backward as rla_update and the block boundary call it: BatchNorm parameters from
// the saved statistics, fresh dgamma / dbeta, dispatched over dtype and layout.
// -> (ds, dh, drec_weight, dgamma, dbeta).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> update_tail_backward_pass(
    const at::Tensor& grad_out, const at::Tensor& s, const at::Tensor& h, const at::Tensor& rec_weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, double eps,
    bool pool, bool training, bool cl) {
  const int64_t k = s.size(1);
  const at::Tensor params = bn_params_from_stats(mean, var, gamma, beta, eps);
  at::Tensor dgamma = device_empty({k}, gamma.options());
  at::Tensor dbeta = device_empty({k}, gamma.options());
  at::Tensor ds, dh, drec;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "update_tail_backward_pass", [&] {
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      std::tie(ds, dh, drec) =
          update_tail_backward<scalar_t, CL>(grad_out, s, h, rec_weight, params, dgamma, dbeta, pool, training);
    });
  });
  return {ds, dh, drec, dgamma, dbeta};
}

}  // namespace cuda
}  // namespace rla_ext
