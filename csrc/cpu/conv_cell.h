// Helpers shared by the ConvGRU / ConvLSTM cell kernels (csrc/cpu/conv_gru_cell.cpp,
// conv_lstm_cell.cpp): the 3x3 conv over cat(a, b), forward and backward, as one convolution over a
// concatenation that lives for the call only or as two with the weight's column segments (also used by
// the basic-block entry, concat_conv3x3_bn_act.cpp), the elementwise walk over a k-channel state beside
// its G*k-channel gate tensor, and GroupNorm (one group per gate and sample) statistics and backward.
//
// Determinism: every reduction runs in an order fixed by the shape (per sample or per channel plane,
// summed sequentially), never by the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/batchnorm.h"
#include "cpu/isa.h"

namespace rla_ext::cpu {

// A conv weight over cat(x, h) split into its x columns [0, C) and its h columns [C, C + K).
struct WeightSegments {
  at::Tensor wx, wh;
};
inline WeightSegments split_columns(const at::Tensor& w, int64_t C) {
  return {w.narrow(1, 0, C).contiguous(), w.narrow(1, C, w.size(1) - C).contiguous()};
}

// conv3x3(in, w, padding 1, stride) + bias, returned in memory format `fmt`.
inline at::Tensor conv3x3(const at::Tensor& in, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          at::MemoryFormat fmt, int64_t stride = 1) {
  return at::conv2d(in, w, bias, stride, 1).contiguous(fmt);
}

// (d input, d weight, d bias (undefined unless `bias`)) of z = conv3x3(in, w, stride) (+ bias).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_backward(const at::Tensor& dz, const at::Tensor& in,
                                                                      const at::Tensor& w, bool bias,
                                                                      at::MemoryFormat fmt, int64_t stride = 1) {
  std::vector<int64_t> bias_sizes{w.size(0)};
  auto r = at::convolution_backward(dz, in, w, bias ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
                                    {stride, stride}, {1, 1}, {1, 1}, false, {0, 0}, 1, {true, true, bias});
  return {std::get<0>(r).contiguous(fmt), std::get<1>(r), std::get<2>(r)};
}

// Who runs a 3x3 conv over cat(a, b): ONE oneDNN convolution over a transient concatenation while it
// is at most 1 MiB, else two over the weight's column segments summed into z. The concatenation costs
// a fresh buffer forward and backward (and the input gradients copied out of its gradient); past ~1 MiB
// that costs more than the second convolution saves, whatever the channel split. Measured on the
// basic-block entry, whole op fwd+bwd against eager (2 cores, AVX-512, fp32, channels_last, k = 16,
// interleaved medians, two runs):
//   C16xH32 s2, N = 8  (1 MiB):    cat 0.99-1.04x, segments 0.91-0.97x
//   C32xH16 s1, N = 8  (0.4 MiB):  cat 0.98-1.01x, segments 0.93x;   C64xH8, N = 8: 0.99-1.00x vs 0.91x
//   C16xH32 s2, N = 16 (2 MiB):    cat 0.98x, segments 1.17x;        N = 32: 0.94x vs 1.04x
//   C32xH16 s2, N = 32 (1.5 MiB):  cat 0.95x, segments 1.10x;        C64xH16, N = 16: 0.93x vs 1.02x
// Nothing of the concatenation is saved: backward builds it again. In half dtypes the two routes round
// z differently (once over the cat; each segment and their sum otherwise), both within the bar.
constexpr int64_t kConvOverCatMaxBytes = int64_t{1} << 20;

inline bool conv_over_cat(const at::Tensor& a, const at::Tensor& b) {
  const int64_t bytes =
      a.size(0) * (a.size(1) + b.size(1)) * a.size(2) * a.size(3) * static_cast<int64_t>(a.element_size());
  return bytes <= kConvOverCatMaxBytes;
}

// conv3x3(cat(a, b), w, padding 1, stride) + bias in format `fmt` (a, b in `fmt`), on conv_over_cat's route.
inline at::Tensor conv3x3_of_cat(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w,
                                 const c10::optional<at::Tensor>& bias, at::MemoryFormat fmt, int64_t stride = 1) {
  if (conv_over_cat(a, b)) return conv3x3(at::cat({a, b}, 1).contiguous(fmt), w.contiguous(), bias, fmt, stride);
  const WeightSegments seg = split_columns(w.contiguous(), a.size(1));
  at::Tensor z = conv3x3(a, seg.wx, bias, fmt, stride);
  z.add_(conv3x3(b, seg.wh, c10::nullopt, fmt, stride));
  return z;
}

// The gradients of conv3x3_of_cat: da and db in `fmt`, dw as w's (C_out, Ca + Cb, 3, 3), dbias (undefined
// unless `bias`).
struct CatConvGrads {
  at::Tensor da, db, dw, dbias;
};
inline CatConvGrads conv3x3_of_cat_backward(const at::Tensor& dz, const at::Tensor& a, const at::Tensor& b,
                                            const at::Tensor& w, bool bias, at::MemoryFormat fmt,
                                            int64_t stride = 1) {
  const int64_t ca = a.size(1), cb = b.size(1);
  if (conv_over_cat(a, b)) {
    auto [dcat, dw, dbias] = conv3x3_backward(dz, at::cat({a, b}, 1).contiguous(fmt), w.contiguous(), bias, fmt,
                                              stride);
    return {dcat.narrow(1, 0, ca).contiguous(fmt), dcat.narrow(1, ca, cb).contiguous(fmt), dw.contiguous(), dbias};
  }
  const WeightSegments seg = split_columns(w.contiguous(), ca);
  auto [da, dwa, dbias] = conv3x3_backward(dz, a, seg.wx, bias, fmt, stride);
  auto [db, dwb, unused] = conv3x3_backward(dz, b, seg.wh, false, fmt, stride);
  return {da, db, at::cat({dwa, dwb}, 1).contiguous(), dbias};
}

// A (N, K, H, W) cell tensor beside a (N, G*K, H, W) gate tensor, both in one memory format.
struct CellLayout {
  int64_t N, K, HW, G;
  bool cl;
};

// f(n, c, s, w, gs) for every element (n, c, pixel) of the cell tensor: s its offset there, w the
// offset of gate 0 at the same (n, c, pixel) in the gate tensor, gs the distance between gates. f may
// write only its own element's outputs: the calls along a channels_last row (an NCHW plane) run as SIMD
// lanes. Without the pragma GCC left these loops scalar (it could not prove the gate loads and the
// stores independent): the LSTM gating pass took 2.0 ms at N=4, k=32, 32x32 against 0.84 ms for
// eager's separate vectorised ops.
template <typename F>
void for_each_cell_element(const CellLayout& L, const F& f) {
  const int64_t K = L.K, HW = L.HW, GK = L.G * L.K;
  if (L.cl) {
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
    at::parallel_for(0, L.N * HW, grain, [&](int64_t r0, int64_t r1) {
      isa_dispatch([&] {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / HW, s0 = r * K, w0 = r * GK;
          RLA_CHANNEL_SIMD
          for (int64_t c = 0; c < K; ++c) f(n, c, s0 + c, w0 + c, K);
        }
      });
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, L.N * K, grain, [&](int64_t q0, int64_t q1) {
    isa_dispatch([&] {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / K, c = q % K, s0 = q * HW, w0 = (n * GK + c) * HW;
        RLA_CHANNEL_SIMD
        for (int64_t p = 0; p < HW; ++p) f(n, c, s0 + p, w0 + p, K * HW);
      }
    });
  });
}

// Per-sample statistics of the G gates of z (N, G*K, H, W): GroupNorm with one group per gate.
// stats is (N, S, 2) (S slots per sample); gate j goes to slot slot0 + j as (mean, rstd), with the
// biased variance. Shifted sums (shift = the group's first value) avoid E[z^2]-E[z]^2 cancellation.
template <typename T, typename acc_t>
void gate_group_stats(const T* z, const CellLayout& L, double eps, acc_t* stats, int64_t slots, int64_t slot0) {
  const int64_t K = L.K, HW = L.HW, GK = L.G * L.K;
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(K * HW);
  at::parallel_for(0, L.N * L.G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> l1(std::max<int64_t>(K, kLanes)), l2(l1.size());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / L.G, j = t % L.G;
      std::fill(l1.begin(), l1.end(), acc_t(0));
      std::fill(l2.begin(), l2.end(), acc_t(0));
      acc_t* a1 = l1.data();
      acc_t* a2 = l2.data();
      acc_t shift;
      if (L.cl) {
        const T* base = z + n * HW * GK + j * K;
        shift = static_cast<acc_t>(base[0]);
        isa_dispatch([&] {
          for (int64_t p = 0; p < HW; ++p) {
            const T* row = base + p * GK;
            RLA_CHANNEL_SIMD
            for (int64_t c = 0; c < K; ++c) {
              const acc_t d = static_cast<acc_t>(row[c]) - shift;
              a1[c] += d;
              a2[c] += d * d;
            }
          }
        });
      } else {
        const T* base = z + (n * GK + j * K) * HW;
        const int64_t m = K * HW;
        shift = static_cast<acc_t>(base[0]);
        isa_dispatch([&] {
          int64_t i = 0;
          for (; i + kLanes <= m; i += kLanes)
            for (int64_t q = 0; q < kLanes; ++q) {
              const acc_t d = static_cast<acc_t>(base[i + q]) - shift;
              a1[q] += d;
              a2[q] += d * d;
            }
          for (int64_t q = 0; i < m; ++i, ++q) {
            const acc_t d = static_cast<acc_t>(base[i]) - shift;
            a1[q] += d;
            a2[q] += d * d;
          }
        });
      }
      acc_t s1 = 0, s2 = 0;
      for (size_t q = 0; q < l1.size(); ++q) {
        s1 += l1[q];
        s2 += l2[q];
      }
      const acc_t mu = s1 * inv_m;
      const acc_t var = std::max(s2 * inv_m - mu * mu, acc_t(0));
      acc_t* st = stats + (n * slots + slot0 + j) * 2;
      st[0] = shift + mu;
      st[1] = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
    }
  });
}

// GroupNorm backward of gate j of z (N, G*K, H, W) given g, the gradient at the norm's output laid out
// as the (N, K, H, W) cell tensor (acc_t): writes dz's gate j, dgamma[K], dbeta[K]. With
// xhat = (z - mean) * rstd per sample and M = K*H*W values per group,
// dz = rstd * (gamma_c g - sum(gamma g) / M - xhat * sum(gamma g xhat) / M).
template <typename T, typename acc_t>
void gate_group_norm_backward(const acc_t* g, const T* z, T* dz, const CellLayout& L, int64_t j,
                              const acc_t* stats, int64_t slots, int64_t slot, const acc_t* gamma, acc_t* dgamma,
                              acc_t* dbeta) {
  const int64_t N = L.N, K = L.K, HW = L.HW, GK = L.G * L.K;
  // Per (n, c): A = sum over pixels of g, B = sum of g * xhat.
  std::vector<acc_t> A(N * K), B(N * K);
  if (L.cl) {
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const acc_t mean = stats[(n * slots + slot) * 2], rstd = stats[(n * slots + slot) * 2 + 1];
        acc_t* a = A.data() + n * K;
        acc_t* b = B.data() + n * K;
        std::fill(a, a + K, acc_t(0));
        std::fill(b, b + K, acc_t(0));
        isa_dispatch([&] {
          for (int64_t p = 0; p < HW; ++p) {
            const acc_t* gr = g + (n * HW + p) * K;
            const T* zr = z + (n * HW + p) * GK + j * K;
            RLA_CHANNEL_SIMD
            for (int64_t c = 0; c < K; ++c) {
              a[c] += gr[c];
              b[c] += gr[c] * ((static_cast<acc_t>(zr[c]) - mean) * rstd);
            }
          }
        });
      }
    });
  } else {
    at::parallel_for(0, N * K, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / K, c = q % K;
        const acc_t mean = stats[(n * slots + slot) * 2], rstd = stats[(n * slots + slot) * 2 + 1];
        const acc_t* gp = g + q * HW;
        const T* zp = z + (n * GK + j * K + c) * HW;
        isa_dispatch([&] {
          acc_t l1[kLanes] = {}, l2[kLanes] = {};
          int64_t i = 0;
          for (; i + kLanes <= HW; i += kLanes)
            for (int64_t u = 0; u < kLanes; ++u) {
              l1[u] += gp[i + u];
              l2[u] += gp[i + u] * ((static_cast<acc_t>(zp[i + u]) - mean) * rstd);
            }
          for (int64_t u = 0; i < HW; ++i, ++u) {
            l1[u] += gp[i];
            l2[u] += gp[i] * ((static_cast<acc_t>(zp[i]) - mean) * rstd);
          }
          acc_t s1 = 0, s2 = 0;
          for (int64_t u = 0; u < kLanes; ++u) {
            s1 += l1[u];
            s2 += l2[u];
          }
          A[q] = s1;
          B[q] = s2;
        });
      }
    });
  }
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(K * HW);
  std::vector<acc_t> ka(N), kb(N);
  for (int64_t c = 0; c < K; ++c) dgamma[c] = dbeta[c] = acc_t(0);
  for (int64_t n = 0; n < N; ++n) {
    acc_t sa = 0, sb = 0;
    for (int64_t c = 0; c < K; ++c) {
      sa += gamma[c] * A[n * K + c];
      sb += gamma[c] * B[n * K + c];
      dgamma[c] += B[n * K + c];
      dbeta[c] += A[n * K + c];
    }
    ka[n] = sa * inv_m;
    kb[n] = sb * inv_m;
  }
  const acc_t *KA = ka.data(), *KB = kb.data();
  for_each_cell_element(L, [=](int64_t n, int64_t c, int64_t s, int64_t w, int64_t gs) {
    const acc_t mean = stats[(n * slots + slot) * 2], rstd = stats[(n * slots + slot) * 2 + 1];
    const acc_t xhat = (static_cast<acc_t>(z[w + j * gs]) - mean) * rstd;
    dz[w + j * gs] = static_cast<T>(rstd * (gamma[c] * g[s] - KA[n] - xhat * KB[n]));
  });
}

}  // namespace rla_ext::cpu
