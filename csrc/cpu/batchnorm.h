// BatchNorm passes shared by both CPU kernels: batch statistics, normalise + activation, and the
// backward reductions. Each is a fused loop over the activation in its own memory format, written
// once here so op A (ReLU / identity) and op B (tanh) cannot drift apart.
//
// Determinism: every reduction splits the work into chunks that depend only on the shape (never
// on the thread count), each chunk writes its own partial sums, and the partials are added in
// chunk order. The same input therefore gives bit-identical statistics on 1 or 16 threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/fast_math.h"
#include "cpu/isa.h"

namespace rla_ext::cpu {

// Where element (n, c, pixel) lives. channels_last: rows of C values, one row per pixel (M = N*HW
// rows). NCHW: N*C planes of HW contiguous values.
struct ChannelLayout {
  int64_t N, C, HW;
  bool channels_last;
  int64_t count() const { return N * HW; }  // values per channel
};

// Pixel rows per chunk of a channels_last reduction: large enough to amortise the per-chunk
// partial buffers, small enough that the per-channel float sums stay short.
constexpr int64_t kRowsPerChunk = 128;
// Independent accumulators per NCHW plane: lets the compiler vectorise the per-channel sums
// without reassociating floating-point additions (which it may not do on its own).
constexpr int64_t kLanes = 16;

// The loop over one pixel row's channels (channels_last). Its iterations touch distinct elements and
// distinct per-channel partial sums, so it may run as SIMD lanes; the vector length is pinned to 16
// because left to itself GCC vectorises 16-bit (half / bfloat16) loads with 32 lanes, so a row of 16
// channels never filled a vector and ran scalar (bfloat16 BatchNorm passes ~4x slower per element than
// float32 at 16 channels). Each channel still sums its rows in order: results are unchanged.
#define RLA_CHANNEL_SIMD _Pragma("omp simd simdlen(16)")

// The hot loops below run through isa_dispatch (cpu/isa.h): compiled for the baseline, AVX2 and
// AVX-512 targets, the variant picked at load for the running CPU. The functors passed in are
// inlined into each variant.

// Rows [r0, r1) of a channels_last tensor: f(i, c, p1[c], p2[c]) for every element.
template <typename acc_t, typename F>
void reduce_rows(int64_t r0, int64_t r1, int64_t C, acc_t* p1, acc_t* p2, const F& f) {
  isa_dispatch([&] {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      RLA_CHANNEL_SIMD
      for (int64_t c = 0; c < C; ++c) f(base + c, c, p1[c], p2[c]);
    }
  });
}

// One NCHW plane of channel c (HW values from `base`), summed in kLanes independent lanes.
template <typename acc_t, typename F>
void reduce_plane(int64_t base, int64_t HW, int64_t c, acc_t& out1, acc_t& out2, const F& f) {
  isa_dispatch([&] {
    acc_t l1[kLanes] = {}, l2[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= HW; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) f(base + i + j, c, l1[j], l2[j]);
    for (int64_t j = 0; i < HW; ++i, ++j) f(base + i, c, l1[j], l2[j]);
    acc_t p1 = 0, p2 = 0;
    for (int64_t j = 0; j < kLanes; ++j) {
      p1 += l1[j];
      p2 += l2[j];
    }
    out1 = p1;
    out2 = p2;
  });
}

template <typename F>
void apply_rows(int64_t r0, int64_t r1, int64_t C, const F& f) {
  isa_dispatch([&] {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      RLA_CHANNEL_SIMD
      for (int64_t c = 0; c < C; ++c) f(base + c, c);
    }
  });
}

template <typename F>
void apply_plane(int64_t base, int64_t HW, int64_t c, const F& f) {
  isa_dispatch([&] {
    for (int64_t i = 0; i < HW; ++i) f(base + i, c);
  });
}

// Adds f's two contributions of every element of each channel into sum1[c], sum2[c].
// f(i, c, a1, a2) reads element i (linear offset) of channel c and adds to a1, a2.
template <typename acc_t, typename F>
void reduce_two_per_channel(const ChannelLayout& L, acc_t* sum1, acc_t* sum2, const F& f) {
  const int64_t C = L.C;
  if (L.channels_last) {
    const int64_t rows = L.N * L.HW;
    const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<acc_t> part(2 * chunks * C, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* p1 = part.data() + 2 * b * C;
        reduce_rows(b * kRowsPerChunk, std::min(rows, (b + 1) * kRowsPerChunk), C, p1, p1 + C, f);
      }
    });
    std::fill(sum1, sum1 + C, acc_t(0));
    std::fill(sum2, sum2 + C, acc_t(0));
    for (int64_t b = 0; b < chunks; ++b) {
      const acc_t* p1 = part.data() + 2 * b * C;
      const acc_t* p2 = p1 + C;
      for (int64_t c = 0; c < C; ++c) {
        sum1[c] += p1[c];
        sum2[c] += p2[c];
      }
    }
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t t1 = 0, t2 = 0;
      for (int64_t n = 0; n < L.N; ++n) {
        acc_t p1, p2;
        reduce_plane((n * C + c) * L.HW, L.HW, c, p1, p2, f);
        t1 += p1;
        t2 += p2;
      }
      sum1[c] = t1;
      sum2[c] = t2;
    }
  });
}

// Calls f(i, c) for every element i of channel c, in parallel; f writes element i only.
template <typename F>
void for_each_element(const ChannelLayout& L, const F& f) {
  const int64_t C = L.C;
  if (L.channels_last) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
    at::parallel_for(0, L.N * L.HW, grain, [&](int64_t r0, int64_t r1) { apply_rows(r0, r1, C, f); });
    return;
  }
  const int64_t HW = L.HW;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, L.N * C, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) apply_plane(p * HW, HW, p % C, f);
  });
}

// Activations after the BatchNorm. grad(up, v) is the gradient at the BN output v given the
// gradient `up` at the activation output.
struct ActIdentity {
  template <typename A> static A fwd(A v) { return v; }
  template <typename A> static A grad(A up, A) { return up; }
};
struct ActRelu {
  // `v < 0 ? 0 : v`, not `v > 0 ? v : 0`: a NaN propagates, as through torch.relu.
  template <typename A> static A fwd(A v) { return v < A(0) ? A(0) : v; }
  // PyTorch's threshold_backward rule, `v <= 0 ? 0 : up`: blocked where the output is not positive,
  // passed where it is positive or NaN.
  template <typename A> static A grad(A up, A v) { return v <= A(0) ? A(0) : up; }
};
struct ActTanh {
  template <typename A> static A fwd(A v) { return tanh_approx(v); }
  template <typename A> static A grad(A up, A v) {
    const A t = tanh_approx(v);
    return up * (A(1) - t * t);
  }
};

// Batch mean and BIASED variance per channel. Shifted sums: every channel is shifted by its first
// value, so the sums stay near the data's spread rather than its offset (no E[x^2]-E[x]^2
// cancellation).
template <typename T, typename acc_t>
void batch_stats(const T* x, const ChannelLayout& L, acc_t* mean, acc_t* var) {
  const int64_t C = L.C;
  std::vector<acc_t> shift(C), s1(C), s2(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(x[L.channels_last ? c : c * L.HW]);
  const acc_t* K = shift.data();
  reduce_two_per_channel<acc_t>(L, s1.data(), s2.data(), [=](int64_t i, int64_t c, acc_t& a1, acc_t& a2) {
    const acc_t d = static_cast<acc_t>(x[i]) - K[c];
    a1 += d;
    a2 += d * d;
  });
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(L.count());
  for (int64_t c = 0; c < C; ++c) {
    const acc_t m = s1[c] * inv_m;
    mean[c] = K[c] + m;
    var[c] = std::max(s2[c] * inv_m - m * m, acc_t(0));
  }
}

// bn(z) = scale * z + shift with scale = gamma * rstd, shift = beta - mean * scale.
template <typename acc_t>
struct BnAffine {
  std::vector<acc_t> scale, shift, rstd;
  BnAffine(const acc_t* mean, const acc_t* var, const acc_t* gamma, const acc_t* beta, int64_t C, double eps)
      : scale(C), shift(C), rstd(C) {
    for (int64_t c = 0; c < C; ++c) {
      rstd[c] = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
      scale[c] = gamma[c] * rstd[c];
      shift[c] = beta[c] - mean[c] * scale[c];
    }
  }
};

// out = Act(gamma * (z - mean) * rstd + beta), computed in acc_t and stored as T.
template <typename Act, typename T, typename acc_t>
void normalize_act(const T* z, T* out, const ChannelLayout& L, const acc_t* mean, const acc_t* var,
                   const acc_t* gamma, const acc_t* beta, double eps) {
  const BnAffine<acc_t> bn(mean, var, gamma, beta, L.C, eps);
  const acc_t* sc = bn.scale.data();
  const acc_t* sh = bn.shift.data();
  for_each_element(L, [=](int64_t i, int64_t c) {
    out[i] = static_cast<T>(Act::fwd(static_cast<acc_t>(z[i]) * sc[c] + sh[c]));
  });
}

// Backward of out = Act(bn(z)): dz from the gradient `up` at Act's output, plus
// dbeta = sum(g), dgamma = sum(g * xhat) with g the gradient at the BN output. Training adds the
// batch-statistics terms, dz = gamma*rstd*(g - dbeta/M - xhat*dgamma/M); eval is dz = gamma*rstd*g.
// Two passes: one reduction (recomputing g from z), one elementwise pass writing dz.
template <typename Act, typename T, typename acc_t>
void bn_act_backward(const T* up, const T* z, T* dz, const ChannelLayout& L, const acc_t* mean, const acc_t* var,
                     const acc_t* gamma, const acc_t* beta, double eps, bool training, acc_t* dgamma,
                     acc_t* dbeta) {
  const int64_t C = L.C;
  const BnAffine<acc_t> bn(mean, var, gamma, beta, C, eps);
  const acc_t* sc = bn.scale.data();
  const acc_t* sh = bn.shift.data();
  std::vector<acc_t> sum_gd(C);
  reduce_two_per_channel<acc_t>(L, dbeta, sum_gd.data(), [=](int64_t i, int64_t c, acc_t& a1, acc_t& a2) {
    const acc_t zi = static_cast<acc_t>(z[i]);
    const acc_t g = Act::grad(static_cast<acc_t>(up[i]), zi * sc[c] + sh[c]);
    a1 += g;
    a2 += g * (zi - mean[c]);
  });
  // dz = k1 * g + k2 * (z - mean) + k3, per channel.
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(L.count());
  std::vector<acc_t> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t rstd = bn.rstd[c];
    dgamma[c] = sum_gd[c] * rstd;
    k1[c] = sc[c];
    k2[c] = training ? -sc[c] * rstd * dgamma[c] * inv_m : acc_t(0);
    k3[c] = training ? -sc[c] * dbeta[c] * inv_m : acc_t(0);
  }
  const acc_t *K1 = k1.data(), *K2 = k2.data(), *K3 = k3.data();
  if (!training) {
    // Eval: dz = gamma*rstd*g alone. Not the training form with zero coefficients: 0 * (z - mean) is
    // NaN where z is NaN or inf, and the reference's eval gradient does not depend on z there.
    for_each_element(L, [=](int64_t i, int64_t c) {
      const acc_t zi = static_cast<acc_t>(z[i]);
      dz[i] = static_cast<T>(K1[c] * Act::grad(static_cast<acc_t>(up[i]), zi * sc[c] + sh[c]));
    });
    return;
  }
  for_each_element(L, [=](int64_t i, int64_t c) {
    const acc_t zi = static_cast<acc_t>(z[i]);
    const acc_t g = Act::grad(static_cast<acc_t>(up[i]), zi * sc[c] + sh[c]);
    dz[i] = static_cast<T>(K1[c] * g + K2[c] * (zi - mean[c]) + K3[c]);
  });
}

}  // namespace rla_ext::cpu
