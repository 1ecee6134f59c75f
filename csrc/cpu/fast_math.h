// tanh for the fused loops. libm's tanhf is an opaque call that stops the compiler from
// vectorising the loop around it; this float version is straight-line arithmetic (exp by range
// reduction and a polynomial) that vectorises, accurate to a few float ulps. double keeps libm,
// since float64 is the gradcheck path where accuracy matters more than speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rla_ext::cpu {

inline double tanh_approx(double v) { return std::tanh(v); }

inline float tanh_approx(float v) {
  const float a = v < 0.f ? -v : v;
  // Small |v|: the odd Taylor series (next term ~ a^9/45 < 1e-11 here) avoids 1 - e cancellation.
  const float a2 = a * a;
  const float series = a * (1.f + a2 * (-1.f / 3.f + a2 * (2.f / 15.f + a2 * (-17.f / 315.f))));
  // Otherwise tanh(a) = (1 - e) / (1 + e), e = exp(-2a) = 2^n * exp(r), |r| <= ln2/2.
  float y = -2.f * a;
  y = y < -87.f ? -87.f : y;
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float nf = (y * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (y - nf * 0.693145751953125f) - nf * 1.42860682030941723e-6f;  // ln2 split hi + lo
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f + r * (1.f / 120.f + r * (1.f / 720.f +
                                                                                          r * (1.f / 5040.f)))))));
  const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float e = p * two_n;
  const float t = a < 0.0625f ? series : (1.f - e) / (1.f + e);
  return v < 0.f ? -t : t;
}

}  // namespace rla_ext::cpu
