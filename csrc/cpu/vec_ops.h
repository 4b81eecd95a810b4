// The ops policy of vae_math.h over at::vec::Vectorized, so the CPU kernels
// evaluate the shared formulas on whole SIMD registers (AVX2 when the build sets
// CPU_CAPABILITY_AVX2; see setup.py).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "../vae_math.h"

namespace fusedvae {
namespace cpu {

// e^x for x <= 0 in float32, the exponential the logit paths need
// (exp(-|x|): math::exp_neg_abs). Cody & Waite's reduction x = n·ln 2 + r,
// |r| <= ln 2 / 2, with ln 2 split in two so that n·ln2_hi is exact; e^r from
// the degree-7 polynomial 1 + r + r²·P(r) of Moshier's Cephes expf; 2^n built in
// the exponent bits. Below x_min = -87.3365 (2^-126, the smallest normal float)
// the result is 0: the loss and its gradient add e^x to terms of order 1.
// NaN gives NaN. Its maximum error over [x_min, 0], measured against mpmath, is
// in tests/test_fast_math.py.
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  constexpr float kXMin = -87.33654475f;  // log(2^-126)
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 8 significant bits: n·kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  // Adding 1.5·2^23 rounds to an integer, which then sits in the low mantissa bits.
  constexpr float kRoundMagic = 12582912.0f;
  const Vec xc = at::vec::maximum(x, Vec(kXMin));
  const Vec shifted = at::vec::fmadd(xc, Vec(kLog2e), Vec(kRoundMagic));
  const Vec n = shifted - Vec(kRoundMagic);
  Vec r = at::vec::fmadd(n, Vec(-kLn2Hi), xc);
  r = at::vec::fmadd(n, Vec(-kLn2Lo), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  const Vec e_r = at::vec::fmadd(p, r * r, r + Vec(1.0f));
  // The low bits of `shifted` hold n + 0x4B400000; shifting n + 127 into the
  // exponent field drops the 0x4B400000, whose low 9 bits are zero. n >= -126.
  const IVec biased = at::vec::cast<int32_t>(shifted) + IVec(127);
  const Vec two_n = at::vec::cast<float>(biased << IVec(23));
  return Vec::blendv(e_r * two_n, Vec(0.0f), x < Vec(kXMin));
}

template <typename T>
struct VecOps {
  using Scalar = T;
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true, as Vectorized comparisons return
  static V splat(double c) { return V(static_cast<T>(c)); }
  static V exp(const V& x) { return x.exp(); }
  static V exp_nonpositive(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::exp_nonpositive(x);
    } else {
      return x.exp();
    }
  }
  static V expm1(const V& x) { return x.expm1(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V sinh(const V& x) { return x.sinh(); }
  static V abs(const V& x) { return x.abs(); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace cpu
}  // namespace fusedvae
