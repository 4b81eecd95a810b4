// The ops policy of vae_math.h over at::vec::Vectorized, so the CPU kernels
// evaluate the shared formulas on whole SIMD registers (AVX2 when the build sets
// CPU_CAPABILITY_AVX2; see setup.py).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../vae_math.h"

namespace fusedvae {
namespace cpu {

namespace detail {

using FloatVec = at::vec::Vectorized<float>;
using IntVec = at::vec::Vectorized<int32_t>;

// Comparisons, selects and clamps for the approximations below. AVX-512 keeps
// comparison results in mask registers, and x86's max/min return their second
// operand where either is NaN, so clamp(x) keeps a NaN x without at::vec's
// extra NaN test; other sets use at::vec.
#if defined(CPU_CAPABILITY_AVX512)
using FloatMask = __mmask16;
FUSEDVAE_ALWAYS_INLINE FloatMask less(const FloatVec& a, const FloatVec& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ);
}
FUSEDVAE_ALWAYS_INLINE FloatMask equal(const FloatVec& a, const FloatVec& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ);
}
FUSEDVAE_ALWAYS_INLINE FloatVec select(FloatMask m, const FloatVec& a, const FloatVec& b) {
  return _mm512_mask_blend_ps(m, b, a);
}
FUSEDVAE_ALWAYS_INLINE FloatVec max_keep_nan(const FloatVec& x, const FloatVec& lo) {
  return _mm512_max_ps(lo, x);
}
FUSEDVAE_ALWAYS_INLINE FloatVec min_keep_nan(const FloatVec& x, const FloatVec& hi) {
  return _mm512_min_ps(hi, x);
}
#else
using FloatMask = FloatVec;
FUSEDVAE_ALWAYS_INLINE FloatMask less(const FloatVec& a, const FloatVec& b) { return a < b; }
FUSEDVAE_ALWAYS_INLINE FloatMask equal(const FloatVec& a, const FloatVec& b) { return a == b; }
FUSEDVAE_ALWAYS_INLINE FloatVec select(const FloatMask& m, const FloatVec& a, const FloatVec& b) {
  return FloatVec::blendv(b, a, m);
}
#if defined(CPU_CAPABILITY_AVX2)
FUSEDVAE_ALWAYS_INLINE FloatVec max_keep_nan(const FloatVec& x, const FloatVec& lo) {
  return _mm256_max_ps(lo, x);
}
FUSEDVAE_ALWAYS_INLINE FloatVec min_keep_nan(const FloatVec& x, const FloatVec& hi) {
  return _mm256_min_ps(hi, x);
}
#else
FUSEDVAE_ALWAYS_INLINE FloatVec max_keep_nan(const FloatVec& x, const FloatVec& lo) {
  return at::vec::maximum(x, lo);
}
FUSEDVAE_ALWAYS_INLINE FloatVec min_keep_nan(const FloatVec& x, const FloatVec& hi) {
  return at::vec::minimum(x, hi);
}
#endif
#endif

// a·b where x is not below lo (NaN x included), +0 where it is: one masked
// multiply on AVX-512, a multiply and an AND of the comparison on AVX2.
FUSEDVAE_ALWAYS_INLINE FloatVec product_unless_below(const FloatVec& x, const FloatVec& lo,
                                                     const FloatVec& a, const FloatVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_and_ps(_mm256_mul_ps(a, b), _mm256_cmp_ps(x, lo, _CMP_NLT_UQ));
#else
  return select(less(x, lo), FloatVec(0.0f), a * b);
#endif
}

// Cody & Waite's reduction x = n·ln 2 + r, |r| <= ln 2 / 2, with ln 2 split in
// two so that n·ln2_hi is exact, for x in [-150·ln 2, 128·ln 2]. Adding
// 1.5·2^23 rounds x·log2(e) to the integer n, which then sits in the low
// mantissa bits: n is those bits less 0x4B400000.
struct ExpReduced {
  IntVec n;
  FloatVec r;
};

FUSEDVAE_ALWAYS_INLINE ExpReduced exp_reduce(const FloatVec& x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 8 significant bits: n·kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;
  const FloatVec shifted = at::vec::fmadd(x, FloatVec(kLog2e), FloatVec(kRoundMagic));
  const FloatVec n = shifted - FloatVec(kRoundMagic);
  FloatVec r = at::vec::fmadd(n, FloatVec(-kLn2Hi), x);
  r = at::vec::fmadd(n, FloatVec(-kLn2Lo), r);
  return {at::vec::cast<int32_t>(shifted) - IntVec(0x4B400000), r};
}

// P with e^r = 1 + r + r²·P(r) for |r| <= ln 2 / 2: degree 4, fitted (Remez) to
// the relative error of e^r, 3.8e-9 with the coefficients rounded to float32;
// r + r²·P(r) is e^r - 1 within 1.9e-8 relative. (Moshier's Cephes expf takes
// degree 5 for 2.7e-9: both are far below the float32 rounding of the result.)
FUSEDVAE_ALWAYS_INLINE FloatVec exp_poly(const FloatVec& r) {
  FloatVec p(1.3814602e-3f);
  p = at::vec::fmadd(p, r, FloatVec(8.368716e-3f));
  p = at::vec::fmadd(p, r, FloatVec(4.166839e-2f));
  p = at::vec::fmadd(p, r, FloatVec(1.6666521e-1f));
  return at::vec::fmadd(p, r, FloatVec(4.9999994e-1f));
}

// 2^n for integer n in [-126, 127], built in the exponent bits.
FUSEDVAE_ALWAYS_INLINE FloatVec pow2(const IntVec& n) {
  return at::vec::cast<float>((n + IntVec(127)) << IntVec(23));
}

// e^r - 1 = r + r²·P(r): the sum keeps the relative accuracy of r for small r.
FUSEDVAE_ALWAYS_INLINE FloatVec expm1_reduced(const FloatVec& r) {
  return at::vec::fmadd(exp_poly(r), r * r, r);
}

}  // namespace detail

// e^x for x <= 0 in float32, the exponential the logit paths need (exp(-|x|):
// math::exp_neg_abs): exp_reduce's n and r, e^r from exp_poly, 2^n built in the
// exponent bits. Below x_min = -87.3365 (2^-126, the smallest normal float) the
// result is 0: the loss and its gradient add e^x to terms of order 1. Those
// lanes are left out of the last product (masked on AVX-512, ANDed away
// elsewhere), not clamped to x_min: e^x_min rounds to a subnormal, and x86
// cores compute subnormal results in microcode (the discretized mixture's CPU
// step took a third longer with log-scales near -3, where many exponents of its
// log-sum-exps lie below x_min). NaN gives NaN. Its maximum error over
// [x_min, 0], measured against mpmath, is in tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> exp_nonpositive(
    const at::vec::Vectorized<float>& x) {
  using namespace detail;
  constexpr float kXMin = -87.33654475f;  // log(2^-126)
  // Lanes below x_min reduce an unclamped x to some n and r; the product drops them.
  const ExpReduced red = exp_reduce(x);
  const FloatVec e_r = at::vec::fmadd(exp_poly(red.r), red.r * red.r, red.r + FloatVec(1.0f));
  return product_unless_below(x, FloatVec(kXMin), e_r, pow2(red.n));
}

// e^x for every float x, exp_nonpositive's reduction and polynomial with 2^n
// applied as 2^⌊n/2⌋·2^(n-⌊n/2⌋), so that results down to the subnormals and
// up to overflow (inf above log(FLT_MAX) = 88.7228) come out right. NaN gives
// NaN. Maximum relative error in tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> exp_approx(const at::vec::Vectorized<float>& x) {
  using namespace detail;
  // e^x < 2^-150 below -104 (rounds to 0) and > FLT_MAX above 89 (inf): clamping
  // there keeps n in [-150, 129] and leaves the result as it was.
  const FloatVec xc = min_keep_nan(max_keep_nan(x, FloatVec(-104.0f)), FloatVec(89.0f));
  const ExpReduced red = exp_reduce(xc);
  const FloatVec e_r = expm1_reduced(red.r) + FloatVec(1.0f);
  const IntVec n = red.n;
  const IntVec half = n >> IntVec(1);
  return e_r * pow2(half) * pow2(n - half);
}

// e^x - 1 for x <= 0, as 2^n·(e^r - 1) + (2^n - 1) from exp_nonpositive's
// reduction: relative accuracy for small |x| as for large, -1 below -17.33
// (x is clamped at -30, where e^x is far below half an ulp of 1). NaN gives NaN.
// Maximum relative error in tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> expm1_nonpositive(
    const at::vec::Vectorized<float>& x) {
  using namespace detail;
  const ExpReduced red = exp_reduce(max_keep_nan(x, FloatVec(-30.0f)));
  const FloatVec two_n = pow2(red.n);
  return at::vec::fmadd(two_n, expm1_reduced(red.r), two_n - FloatVec(1.0f));
}

// e^x - 1 for every x, the KL's expm1 of a log-variance: expm1_nonpositive's
// 2^n·(e^r - 1) + (2^n - 1) while 2^n - 1 is not 2^n (x < 16), and above
// (e^r·2^⌊n/2⌋)·2^(n-⌊n/2⌋) - 1 as exp_approx, finite up to 88.72 and inf
// beyond. x is clamped to [-30, 89]. NaN gives NaN. Maximum relative error in
// tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> expm1_approx(
    const at::vec::Vectorized<float>& x) {
  using namespace detail;
  const ExpReduced red =
      exp_reduce(min_keep_nan(max_keep_nan(x, FloatVec(-30.0f)), FloatVec(89.0f)));
  const FloatVec p = expm1_reduced(red.r);
  const IntVec n = red.n;
  const IntVec half = n >> IntVec(1);
  const FloatVec large = (p + FloatVec(1.0f)) * pow2(half) * pow2(n - half) - FloatVec(1.0f);
  const FloatVec two_n = pow2(at::vec::minimum(n, IntVec(24)));
  const FloatVec small = at::vec::fmadd(two_n, p, two_n - FloatVec(1.0f));
  return select(less(x, FloatVec(16.0f)), small, large);
}

namespace detail {

// x = 2^k·m with m in [√½, √2), for positive x (subnormal x is scaled by 2^23
// first); k as a float. Other x give some finite k and m.
struct LogReduced {
  FloatVec k;
  FloatVec m;
};

FUSEDVAE_ALWAYS_INLINE LogReduced log_reduce(const FloatVec& x) {
  constexpr float kTiny = 1.17549435e-38f;       // 2^-126, the smallest normal float
  constexpr int32_t kSqrtHalfBits = 0x3f3504f3;  // √½ as float32 bits
  const FloatMask subnormal = less(x, FloatVec(kTiny));
  const FloatVec xs = select(subnormal, x * FloatVec(8388608.0f), x);
  // k = the exponent of xs/√½; m = xs/2^k in [√½, √2).
  const IntVec shifted_bits = at::vec::cast<int32_t>(xs) - IntVec(kSqrtHalfBits);
  const IntVec k = shifted_bits >> IntVec(23);
  const FloatVec m =
      at::vec::cast<float>((shifted_bits & IntVec(0x007fffff)) + IntVec(kSqrtHalfBits));
  // k as a float: k + 1.5·2^23 in the low mantissa bits, minus 1.5·2^23 (and 23 for subnormal x).
  const FloatVec kf = at::vec::cast<float>(k + IntVec(0x4B400000)) -
                      select(subnormal, FloatVec(12582912.0f + 23.0f), FloatVec(12582912.0f));
  return {kf, m};
}

// k·ln 2 + log(m) for m in [√½, √2): with f = m - 1, f - f²/2 + f³·P(f), k·ln 2 in two parts.
FUSEDVAE_ALWAYS_INLINE FloatVec log_of_reduced(const FloatVec& kf, const FloatVec& m) {
  const FloatVec f = m - FloatVec(1.0f);
  const FloatVec z = f * f;
  FloatVec p(7.0376836292e-2f);
  p = at::vec::fmadd(p, f, FloatVec(-1.1514610310e-1f));
  p = at::vec::fmadd(p, f, FloatVec(1.1676998740e-1f));
  p = at::vec::fmadd(p, f, FloatVec(-1.2420140846e-1f));
  p = at::vec::fmadd(p, f, FloatVec(1.4249322787e-1f));
  p = at::vec::fmadd(p, f, FloatVec(-1.6668057665e-1f));
  p = at::vec::fmadd(p, f, FloatVec(2.0000714765e-1f));
  p = at::vec::fmadd(p, f, FloatVec(-2.4999993993e-1f));
  p = at::vec::fmadd(p, f, FloatVec(3.3333331174e-1f));
  FloatVec y = p * f * z;
  y = at::vec::fmadd(kf, FloatVec(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, FloatVec(-0.5f), y);
  return at::vec::fmadd(kf, FloatVec(0.693359375f), f + y);
}

}  // namespace detail

// log(x) for float x, Moshier's Cephes logf: x = 2^k·m with m in [√½, √2),
// log(x) = k·ln 2 + log(1 + f), f = m - 1, from f - f²/2 + f³·P(f), k·ln 2 in
// two parts. Subnormal x is scaled by 2^23 first. log(0) = -inf, log(x < 0) =
// NaN, log(inf) = inf, NaN gives NaN. Maximum relative error in
// tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> log_approx(const at::vec::Vectorized<float>& x) {
  using namespace detail;
  const LogReduced r = log_reduce(x);
  FloatVec out = log_of_reduced(r.k, r.m);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  out = select(equal(x, FloatVec(0.0f)), FloatVec(-kInf), out);
  out = select(less(x, FloatVec(0.0f)), FloatVec(std::numeric_limits<float>::quiet_NaN()), out);
  // inf and NaN come back as they are: x where it is not below inf.
  return select(less(x, FloatVec(kInf)), out, x);
}

// log(a·b·c) for finite a, b, c >= 0 with one polynomial: the three reduced
// as log_approx reduces them, the product of their m (in [0.35, 2.83)) reduced
// again, the k summed. The discretized mixture's log of a component's three
// channel probabilities. Subnormals are exact as in log_approx; -inf where a
// factor is 0; NaN gives NaN. Maximum error in tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> log_product3(
    const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
    const at::vec::Vectorized<float>& c) {
  using namespace detail;
  const LogReduced ra = log_reduce(a);
  const LogReduced rb = log_reduce(b);
  const LogReduced rc = log_reduce(c);
  const LogReduced r = log_reduce(ra.m * rb.m * rc.m);
  FloatVec out = log_of_reduced((ra.k + rb.k) + (rc.k + r.k), r.m);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const FloatVec smallest = min_keep_nan(min_keep_nan(a, b), c);
  out = select(equal(smallest, FloatVec(0.0f)), FloatVec(-kInf), out);
  // (a + b + c)·0 is 0, or NaN where a factor is NaN.
  return out + (a + b + c) * FloatVec(0.0f);
}

// tanh(x) = -m/(2 + m) with m = expm1(-2|x|), the sign of x put back: no
// cancellation for small |x|, exactly ±1 for large. NaN gives NaN. Maximum
// relative error in tests/test_fast_math.py.
FUSEDVAE_ALWAYS_INLINE at::vec::Vectorized<float> tanh_approx(const at::vec::Vectorized<float>& x) {
  using namespace detail;
  const FloatVec sign = x & FloatVec(-0.0f);
  const FloatVec m = expm1_nonpositive(FloatVec(-2.0f) * x.abs());
  return (FloatVec(0.0f) - m) / (FloatVec(2.0f) + m) | sign;
}

template <typename T>
struct VecOps {
  using Scalar = T;
  using V = at::vec::Vectorized<T>;
  FUSEDVAE_ALWAYS_INLINE static V splat(double c) { return V(static_cast<T>(c)); }
  // a·b + c, fused where the instruction set has FMA.
  FUSEDVAE_ALWAYS_INLINE static V fma(const V& a, const V& b, const V& c) {
    return at::vec::fmadd(a, b, c);
  }
  FUSEDVAE_ALWAYS_INLINE static V exp(const V& x) { return x.exp(); }
  FUSEDVAE_ALWAYS_INLINE static V divide_1_4(const V& a, const V& b) { return a / b; }
  FUSEDVAE_ALWAYS_INLINE static V exp_nonpositive(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::exp_nonpositive(x);
    } else {
      return x.exp();
    }
  }
  // The float32 approximations above; double keeps the library functions.
  FUSEDVAE_ALWAYS_INLINE static V exp_approx(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::exp_approx(x);
    } else {
      return x.exp();
    }
  }
  FUSEDVAE_ALWAYS_INLINE static V expm1_nonpositive(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::expm1_nonpositive(x);
    } else {
      return x.expm1();
    }
  }
  FUSEDVAE_ALWAYS_INLINE static V expm1_approx(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::expm1_approx(x);
    } else {
      return x.expm1();
    }
  }
  FUSEDVAE_ALWAYS_INLINE static V log_approx(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::log_approx(x);
    } else {
      return x.log();
    }
  }
  FUSEDVAE_ALWAYS_INLINE static V log_product3(const V& a, const V& b, const V& c) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::log_product3(a, b, c);
    } else {
      return a.log() + b.log() + c.log();
    }
  }
  FUSEDVAE_ALWAYS_INLINE static V tanh_approx(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::tanh_approx(x);
    } else {
      return x.tanh();
    }
  }
  FUSEDVAE_ALWAYS_INLINE static V log(const V& x) { return x.log(); }
  FUSEDVAE_ALWAYS_INLINE static V log1p(const V& x) { return x.log1p(); }
  FUSEDVAE_ALWAYS_INLINE static V tanh(const V& x) { return x.tanh(); }
  FUSEDVAE_ALWAYS_INLINE static V sinh(const V& x) { return x.sinh(); }
  FUSEDVAE_ALWAYS_INLINE static V abs(const V& x) { return x.abs(); }
#if defined(CPU_CAPABILITY_AVX512)
  // AVX-512 compares into mask registers; kept there, a select is one blend
  // (at::vec's comparisons widen the mask to a vector, which blendv narrows again).
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  using Mask = std::conditional_t<std::is_same_v<T, float>, __mmask16, __mmask8>;
  template <int kPredicate>
  FUSEDVAE_ALWAYS_INLINE static Mask compare(const V& a, const V& b) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_cmp_ps_mask(a, b, kPredicate);
    } else {
      return _mm512_cmp_pd_mask(a, b, kPredicate);
    }
  }
  // The predicates of Vectorized's <, >=, >: false where either side is NaN.
  FUSEDVAE_ALWAYS_INLINE static Mask lt(const V& a, const V& b) {
    return compare<_CMP_LT_OQ>(a, b);
  }
  FUSEDVAE_ALWAYS_INLINE static Mask ge(const V& a, const V& b) {
    return compare<_CMP_GE_OQ>(a, b);
  }
  FUSEDVAE_ALWAYS_INLINE static Mask gt(const V& a, const V& b) {
    return compare<_CMP_GT_OQ>(a, b);
  }
  FUSEDVAE_ALWAYS_INLINE static V select(Mask m, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_mask_blend_ps(m, b, a);
    } else {
      return _mm512_mask_blend_pd(m, b, a);
    }
  }
#else
  using Mask = V;  // all-ones lanes where true, as Vectorized comparisons return
  FUSEDVAE_ALWAYS_INLINE static Mask lt(const V& a, const V& b) { return a < b; }
  FUSEDVAE_ALWAYS_INLINE static Mask ge(const V& a, const V& b) { return a >= b; }
  FUSEDVAE_ALWAYS_INLINE static Mask gt(const V& a, const V& b) { return a > b; }
  FUSEDVAE_ALWAYS_INLINE static V select(const Mask& m, const V& a, const V& b) {
    return V::blendv(b, a, m);
  }
#endif
};

}  // namespace cpu
}  // namespace fusedvae
