// tanh for the fused loops. libm's tanhf is an opaque call that stops the compiler from
// vectorising the loop around it; this float version is straight-line arithmetic (expm1 by range
// reduction and a polynomial) that vectorises, accurate to a few float ulps. double keeps libm,
// since float64 is the gradcheck path where accuracy matters more than speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rla_ext::cpu {

inline double tanh_approx(double v) { return std::tanh(v); }

// exp(y) = two_n * (1 + q) for y <= 0 (clamped at -87, where exp is ~1e-38); NaN propagates.
inline void exp_neg_parts(float y, float& two_n, float& q) {
  y = y < -87.f ? -87.f : y;
  // y = n*ln2 + r, |r| <= ln2/2; expm1(y) = 2^n * expm1(r) + (2^n - 1). For |y| < ln2/2, n = 0 and
  // the result is the polynomial alone, so small |v| keeps full relative accuracy.
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float nf = (y * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (y - nf * 0.693145751953125f) - nf * 1.42860682030941723e-6f;  // ln2 split hi + lo
  // expm1(r) by its Taylor series to r^8 (next term < 2e-9 for |r| <= ln2/2).
  q =
      r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f + r * (1.f / 120.f + r * (1.f / 720.f +
                                                                                      r * (1.f / 5040.f + r * (1.f / 40320.f))))))));
  const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
  std::memcpy(&two_n, &bits, sizeof(two_n));
}

// expm1(y) for y <= 0.
inline float expm1_neg_approx(float y) {
  float two_n, q;
  exp_neg_parts(y, two_n, q);
  return two_n * q + (two_n - 1.f);
}

// exp(y) for y <= 0, with full relative accuracy down to exp(-87).
inline float exp_neg_approx(float y) {
  float two_n, q;
  exp_neg_parts(y, two_n, q);
  return two_n * q + two_n;
}

inline float tanh_approx(float v) {
  // tanh(a) = -m / (2 + m) with m = expm1(-2a), a = |v|; branch-free, so the loop around it
  // vectorises even under -ftrapping-math, which forbids if-converting branches that hold
  // arithmetic (fabs / copysign instead of `v < 0 ? ...`, which GCC would thread into two copies).
  const float m = expm1_neg_approx(-2.f * std::fabs(v));
  const float t = -m / (2.f + m);
  return std::copysign(t, v);
}

inline double sigmoid_approx(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// sigmoid(v) = 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0, with e = exp(-|v|) (never overflows);
// both sides computed, then selected, so the loop stays branch-free. NaN propagates.
inline float sigmoid_approx(float v) {
  const float e = exp_neg_approx(-std::fabs(v));
  const float d = 1.f / (1.f + e);
  return v < 0.f ? e * d : d;
}

}  // namespace rla_ext::cpu
