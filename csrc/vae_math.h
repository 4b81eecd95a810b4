// Per-element math of the VAE objective: the one definition shared by the CPU
// and CUDA kernels.
//
// Every formula is a template over an "ops policy" O that supplies the
// primitive operations on a value type O::V (exp, log1p, select, ...).
// `ScalarOps<float>` / `ScalarOps<double>` below serve the CUDA kernels and the
// scalar paths; the CPU kernels instantiate the same formulas with a policy over
// at::vec::Vectorized (cpu/vec_ops.h). Branches are written as selects so that
// the vector instantiation computes exactly what the scalar one does.
#pragma once

#include <array>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDVAE_HD __host__ __device__ __forceinline__
#else
#define FUSEDVAE_HD inline
#endif

// FUSEDVAE_HD, inlined by force on the host too: for the few-instruction
// helpers inside the kernels' long per-pixel loops (dmol.h, cpu/vec_ops.h, the
// CPU loads and stores). GCC's inliner gives up on those loops and leaves
// calls, and around a call every live vector register is spilled to the stack
// (all are caller-saved). CUDA inlines FUSEDVAE_HD functions already.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDVAE_ALWAYS_INLINE FUSEDVAE_HD
#elif defined(__GNUC__)  // GCC and clang
#define FUSEDVAE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FUSEDVAE_ALWAYS_INLINE inline
#endif

namespace fusedvae {
namespace math {

// Scalar policy. The float overloads call the single-precision libm functions
// so host and device code round the same way.
template <typename T>
struct ScalarOps;

template <>
struct ScalarOps<float> {
  using Scalar = float;
  using V = float;
  using Mask = bool;
  static FUSEDVAE_HD V splat(double c) { return static_cast<float>(c); }
  // a·b + c: one rounding on the GPU; the host builds (baseline code without
  // FMA instructions) round twice rather than call the library's fma.
  static FUSEDVAE_HD V fma(V a, V b, V c) {
#if defined(__CUDA_ARCH__)
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
  }
  static FUSEDVAE_HD V exp(V x) { return expf(x); }
  static FUSEDVAE_HD V exp_nonpositive(V x) { return expf(x); }
  // a / b for b in [1, 4]. On the GPU from the hardware's reciprocal estimate
  // (PTX rcp.approx.ftz: one MUFU.RCP) and one correction with the exact
  // residual a - b·q: four instructions, where a division takes about ten and a
  // branch. __fdividef(1, b) takes the same estimate but first tests for and
  // scales a subnormal divisor: five more instructions on every call.
  // tests/test_fast_math.py bounds the sigmoid and softplus built on it, on
  // every device. The host divides.
  static FUSEDVAE_HD V divide_1_4(V a, V b) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
    const float q = a * r;
    return fmaf(fmaf(-b, q, a), r, q);
#else
    return a / b;
#endif
  }
  // The CPU's float32 kernels evaluate these four as polynomials (cpu/vec_ops.h);
  // here they are the library functions, so CUDA's results do not change.
  static FUSEDVAE_HD V exp_approx(V x) { return expf(x); }
  static FUSEDVAE_HD V expm1_nonpositive(V x) { return expm1f(x); }
  static FUSEDVAE_HD V expm1_approx(V x) { return expm1f(x); }
  static FUSEDVAE_HD V log_approx(V x) { return logf(x); }
  static FUSEDVAE_HD V log_product3(V a, V b, V c) { return logf(a) + logf(b) + logf(c); }
  static FUSEDVAE_HD V tanh_approx(V x) { return tanhf(x); }
  static FUSEDVAE_HD V log(V x) { return logf(x); }
  static FUSEDVAE_HD V log1p(V x) { return log1pf(x); }
  static FUSEDVAE_HD V tanh(V x) { return tanhf(x); }
  static FUSEDVAE_HD V sinh(V x) { return sinhf(x); }
  static FUSEDVAE_HD V abs(V x) { return fabsf(x); }
  static FUSEDVAE_HD Mask lt(V a, V b) { return a < b; }
  static FUSEDVAE_HD Mask ge(V a, V b) { return a >= b; }
  static FUSEDVAE_HD Mask gt(V a, V b) { return a > b; }
  static FUSEDVAE_HD V select(Mask m, V a, V b) { return m ? a : b; }
};

template <>
struct ScalarOps<double> {
  using Scalar = double;
  using V = double;
  using Mask = bool;
  static FUSEDVAE_HD V splat(double c) { return c; }
  // a·b + c: one rounding on the GPU; the host builds (baseline code without
  // FMA instructions) round twice rather than call the library's fma.
  static FUSEDVAE_HD V fma(V a, V b, V c) {
#if defined(__CUDA_ARCH__)
    return ::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static FUSEDVAE_HD V exp(V x) { return ::exp(x); }
  static FUSEDVAE_HD V exp_nonpositive(V x) { return ::exp(x); }
  static FUSEDVAE_HD V divide_1_4(V a, V b) { return a / b; }
  static FUSEDVAE_HD V exp_approx(V x) { return ::exp(x); }
  static FUSEDVAE_HD V expm1_nonpositive(V x) { return ::expm1(x); }
  static FUSEDVAE_HD V expm1_approx(V x) { return ::expm1(x); }
  static FUSEDVAE_HD V log_approx(V x) { return ::log(x); }
  static FUSEDVAE_HD V log_product3(V a, V b, V c) { return ::log(a) + ::log(b) + ::log(c); }
  static FUSEDVAE_HD V tanh_approx(V x) { return ::tanh(x); }
  static FUSEDVAE_HD V log(V x) { return ::log(x); }
  static FUSEDVAE_HD V log1p(V x) { return ::log1p(x); }
  static FUSEDVAE_HD V tanh(V x) { return ::tanh(x); }
  static FUSEDVAE_HD V sinh(V x) { return ::sinh(x); }
  static FUSEDVAE_HD V abs(V x) { return ::fabs(x); }
  static FUSEDVAE_HD Mask lt(V a, V b) { return a < b; }
  static FUSEDVAE_HD Mask ge(V a, V b) { return a >= b; }
  static FUSEDVAE_HD Mask gt(V a, V b) { return a > b; }
  static FUSEDVAE_HD V select(Mask m, V a, V b) { return m ? a : b; }
};

// k / 255 for the pixel values k = 0..255, correctly rounded as the division
// is, without a division: k·(1/255) and one correction with the exact residual
// k - 255·q give the same float for every k (tests/test_dtypes_layouts.py
// checks all 256 bit for bit, on every device). `fma(a, b, c)` must round
// a·b + c once.
template <class V, class Fma>
FUSEDVAE_ALWAYS_INLINE V pixel_quotient(const V& k, const Fma& fma) {
  const V inv(1.0f / 255.0f);
  const V q = k * inv;
  return fma(fma(q, V(-255.0f), k), inv, q);
}

// Policies for the CUDA kernels with float accumulation: a float policy
// (ScalarOps<float> or another of these) with some of its functions taken from
// the hardware's approximations, chosen by KernelOptions. On the host each is
// its Base.

#if defined(__CUDA_ARCH__)
// e^x as the hardware's base-2 exponential of x·log2 e (one FMUL and one
// MUFU.EX2): ex2.approx.ftz flushes results below 2^-126 to 0, ex2.approx
// keeps them (a few more instructions).
template <bool kFlush>
__device__ __forceinline__ float hardware_exp(float x) {
  float r;
  if constexpr (kFlush) {
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.44269504088896341f));
  } else {
    asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x * 1.44269504088896341f));
  }
  return r;
}
#endif

// The hardware's approximate logarithm for log_approx and log_product3
// (MUFU.LG2: __logf, __log2f; KernelOptions::cuda_mixture_fast_math). The CUDA
// Programming Guide's table of intrinsics bounds the error at about 2^-21
// absolute on [0.5, 2] and a few ulps elsewhere: for the discretized mixture's
// channel probabilities in (0, 1], well inside its bars, where logf takes some
// thirty instructions. Built without -ftz, a subnormal argument is scaled by
// 2^24 first (a compare, a multiply and an add around the MUFU.LG2), so a bin
// narrower than 2^-126 (a raw log-scale above about 82) keeps a finite log.
template <class Base>
struct WithFastLog : Base {
  using V = typename Base::V;
  static FUSEDVAE_HD V log_approx(V x) {
#if defined(__CUDA_ARCH__)
    return __logf(x);
#else
    return Base::log_approx(x);
#endif
  }
  static FUSEDVAE_HD V log_product3(V a, V b, V c) {
#if defined(__CUDA_ARCH__)
    return (__log2f(a) + __log2f(b) + __log2f(c)) * 0.693147180559945309f;
#else
    return Base::log_product3(a, b, c);
#endif
  }
};

// The hardware's base-2 exponential for exp_nonpositive (ex2.approx.ftz of
// x·log2(e): an FMUL and one MUFU.EX2, where expf takes eight instructions;
// KernelOptions::cuda_fast_exp). In the normal range it is __expf, which the
// CUDA Programming Guide bounds at 2 + floor(1.173·|x|) ulps: e^-|x| within
// (2 + 1.173·|x|)·2^-23·e^-|x| of the truth, at most 2.4e-7 absolute (at
// x = 0), which bounds the error it adds to the softplus and the sigmoid built
// on it. Results below 2^-126 (x < -87.3) flush to 0, where expf returns a
// subnormal.
template <class Base>
struct WithFastExp : Base {
  using V = typename Base::V;
  static FUSEDVAE_HD V exp_nonpositive(V x) {
#if defined(__CUDA_ARCH__)
    return hardware_exp<true>(x);
#else
    return Base::exp_nonpositive(x);
#endif
  }
};

// The discretized mixture's inverse scale and the expm1 of its bin width from
// the hardware's base-2 exponential (KernelOptions::cuda_mixture_fast_scale),
// where expf and expm1f take about ten and thirty-five instructions:
// - exp_approx(x) = e^x as ex2.approx.f32(x·log2 e), which is __expf: within
//   2 + 1.173·|x| ulps, 1.3e-6 relative for |x| <= 7 (s = e^{-log_scale} at
//   the default clamp). Not .ftz: the inverse scale of a log-scale above 87.3
//   is a subnormal float, and flushed to 0 it would give a bin of width 0 and
//   an NLL of inf.
// - expm1_nonpositive(x) = e^x - 1 for x <= 0: above -ln(2)/2 the Taylor
//   polynomial of degree 7 (within 1e-7 relative there, its rounding
//   included), below it ex2.approx.ftz(x·log2 e) - 1, a result in [-1, -0.29]
//   whose error is a few ulps of e^x: below 6e-7 relative. NaN gives NaN.
template <class Base>
struct WithFastScale : Base {
  using V = typename Base::V;
  static FUSEDVAE_HD V exp_approx(V x) {
#if defined(__CUDA_ARCH__)
    return hardware_exp<false>(x);
#else
    return Base::exp_approx(x);
#endif
  }
  static FUSEDVAE_HD V expm1_nonpositive(V x) {
#if defined(__CUDA_ARCH__)
    const float e = hardware_exp<true>(x);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, x, 1.0f / 720.0f);
    p = fmaf(p, x, 1.0f / 120.0f);
    p = fmaf(p, x, 1.0f / 24.0f);
    p = fmaf(p, x, 1.0f / 6.0f);
    p = fmaf(p, x, 0.5f);
    p = fmaf(p, x, 1.0f);
    return x > -0.346573590279972655f ? p * x : e - 1.0f;
#else
    return Base::expm1_nonpositive(x);
#endif
  }
};

// The objective's logits likelihoods under KernelOptions::cuda_fast_exp.
using FastExpOps = WithFastExp<ScalarOps<float>>;
// The discretized mixture's float32 kernels under cuda_mixture_fast_math, and
// with cuda_mixture_fast_scale as well.
using FastLogExpOps = WithFastExp<WithFastLog<ScalarOps<float>>>;
using FastScaleOps = WithFastScale<FastLogExpOps>;

// PyTorch's binary_cross_entropy clamps each log at -100 and divides its
// gradient by max(p(1-p), 1e-12); the probability paths follow both conventions.
constexpr double kLogClampMin = -100.0;
constexpr double kBceGradEps = 1e-12;

// Below this |logit| the continuous-Bernoulli normaliser and its derivative use
// their Taylor series (8 terms). Above it the closed forms lose a few ulps; below
// it 1/η - 1/sinh(η) cancels, with a relative error of about 12·eps/η². The
// bound balances that against the truncation of the series: 1.0 for float
// (truncation 2e-8), 0.35 for double (both sides near 1e-14).
// tests/test_cb_normalizer.py measures the result against mpmath.
template <class O>
constexpr double cb_series_bound() {
  return sizeof(typename O::Scalar) == sizeof(double) ? 0.35 : 1.0;
}

// ---------------------------------------------------------------- Bernoulli --

// log(1 + e) for e in [0, 1], as 2·atanh(u) with u = e/(2 + e) in [0, 1/3]:
// u·Q(u²), Q of degree 4 fitted (Remez) to 2·atanh(u)/u over u² in [0, 1/9],
// relative error 7.8e-9 with the coefficients rounded to float32 (an eighth of
// a float ulp; the truncated series 2u·Σ_k u^{2k}/(2k+1) needs 8 terms for
// 2e-9), at a fraction of the cost of a full-range log1p (the softplus term
// below is the forward's hot spot on CPU). Double precision keeps the library
// log1p.
template <class O>
FUSEDVAE_HD typename O::V log1p_unit(typename O::V e) {
  using V = typename O::V;
  if constexpr (sizeof(typename O::Scalar) == sizeof(double)) {
    return O::log1p(e);
  } else {
    const V u = O::divide_1_4(e, O::splat(2.0) + e);
    const V w = u * u;
    V q = O::splat(0.28178334);
    q = O::fma(q, w, O::splat(0.279606));
    q = O::fma(q, w, O::splat(0.4002491));
    q = O::fma(q, w, O::splat(0.66666317));
    q = O::fma(q, w, O::splat(2.0));
    return u * q;
  }
}

// The logit paths share e = exp(-|x|) between the softplus, the sigmoid and
// the continuous-Bernoulli normaliser: one exp per element.

// max(x, 0) - t*x + log1p(exp(-|x|)), given e = exp(-|x|): finite for every finite x,
// and never log(0): the log1p argument e lies in [0, 1].
template <class O>
FUSEDVAE_HD typename O::V bce_logits_loss_from(typename O::V x, typename O::V t, typename O::V e) {
  // Computed as (1 - t)·x + max(-x, 0) + log1p(e), the product fused into the
  // first sum: the same value, and at x = ±inf the same inf/NaN as
  // torch.nn.functional.binary_cross_entropy_with_logits (+inf at x = +inf,
  // t < 1; NaN at x = +inf, t = 1 and at x = -inf).
  using V = typename O::V;
  const V zero = O::splat(0.0);
  return O::fma(O::splat(1.0) - t, x, O::select(O::gt(zero, x), zero - x, zero)) + log1p_unit<O>(e);
}

// sigmoid(x) given e = exp(-|x|), exact on both tails. The sign test is the
// softplus's (x < 0), so a kernel computing both compares once.
template <class O>
FUSEDVAE_HD typename O::V sigmoid_from(typename O::V x, typename O::V e) {
  using V = typename O::V;
  const V inv = O::divide_1_4(O::splat(1.0), O::splat(1.0) + e);
  return O::select(O::gt(O::splat(0.0), x), e * inv, inv);
}

template <class O>
FUSEDVAE_HD typename O::V exp_neg_abs(typename O::V x) {
  // exp_nonpositive: the policy's exponential for arguments <= 0 (the CPU's
  // float32 one is a polynomial for that range, cpu/vec_ops.h).
  return O::exp_nonpositive(O::splat(0.0) - O::abs(x));
}

template <class O>
FUSEDVAE_HD typename O::V bce_logits_loss(typename O::V x, typename O::V t) {
  return bce_logits_loss_from<O>(x, t, exp_neg_abs<O>(x));
}

// d/dx of bce_logits_loss: sigmoid(x) - t.
template <class O>
FUSEDVAE_HD typename O::V bce_logits_grad(typename O::V x, typename O::V t) {
  return sigmoid_from<O>(x, exp_neg_abs<O>(x)) - t;
}

// log(p) and log(1 - p), each clamped at -100 (PyTorch's BCE convention).
template <class O>
FUSEDVAE_HD typename O::V clamped_log(typename O::V p) {
  using V = typename O::V;
  const V lo = O::splat(kLogClampMin);
  const V log_p = O::log(p);
  // Written so that NaN propagates: a NaN compares false and is kept.
  return O::select(O::lt(log_p, lo), lo, log_p);
}
template <class O>
FUSEDVAE_HD typename O::V clamped_log1m(typename O::V p) {
  using V = typename O::V;
  const V lo = O::splat(kLogClampMin);
  const V log_1mp = O::log1p(O::splat(0.0) - p);
  return O::select(O::lt(log_1mp, lo), lo, log_1mp);
}

// -(t*log p + (1-t)*log(1-p)), logs clamped at -100.
template <class O>
FUSEDVAE_HD typename O::V bce_probs_loss(typename O::V p, typename O::V t) {
  const typename O::V one = O::splat(1.0);
  return (t - one) * clamped_log1m<O>(p) - t * clamped_log<O>(p);
}

// (p - t) / max(p(1-p), 1e-12), as torch.nn.functional.binary_cross_entropy.
template <class O>
FUSEDVAE_HD typename O::V bce_probs_grad(typename O::V p, typename O::V t) {
  using V = typename O::V;
  const V eps = O::splat(kBceGradEps);
  const V var = (O::splat(1.0) - p) * p;
  return (p - t) / O::select(O::lt(var, eps), eps, var);
}

// ------------------------------------------------- continuous Bernoulli ------
// Loaiza-Ganem & Cunningham 2019: p(t|η) = C(η) exp(BCE-likelihood), with
// C(η) = η / tanh(η/2) and C(0) = 2.

// log C(η), given a = |η| and e = exp(-a).
// Series: log 2 + Σ_n (2^{2n}-2)|B_2n| a^{2n} / (2n (2n)!), alternating.
// Closed form: C = a / tanh(a/2) = a(1 + e)/(1 - e); above the series bound
// 1 - e >= 0.29, so the ratio (>= 2) carries a few roundings and its log a
// few ulps.
template <class O>
FUSEDVAE_HD typename O::V cb_log_normalizer_from(typename O::V a, typename O::V e) {
  using V = typename O::V;
  const V one = O::splat(1.0);
  const V a2 = a * a;
  V series = O::splat(1.5659479531834029189e-8);
  series = series * a2 + O::splat(-1.8027895356488830916e-7);
  series = series * a2 + O::splat(2.1336045641601197157e-6);
  series = series * a2 + O::splat(-2.6248346560846560847e-5);
  series = series * a2 + O::splat(3.4171075837742504409e-4);
  series = series * a2 + O::splat(-4.8611111111111111111e-3);
  series = series * a2 + O::splat(8.3333333333333333333e-2);
  series = series * a2 + O::splat(0.69314718055994530942);
  const V closed = O::log(a * (one + e) / (one - e));
  return O::select(O::lt(a, O::splat(cb_series_bound<O>())), series, closed);
}

// d log C / dη = 1/η - 1/sinh(η), given a = |η| and e = exp(-a).
// Series: Σ_n (-1)^{n+1} (2^{2n}-2)|B_2n| η^{2n-1}/(2n)!.
// Closed form: sign(η)·(1/a - 2e/(1 - e²)); for large a, e underflows and the
// derivative is exactly 1/η.
template <class O>
FUSEDVAE_HD typename O::V cb_log_normalizer_grad_from(typename O::V eta, typename O::V a,
                                                      typename O::V e) {
  using V = typename O::V;
  const V one = O::splat(1.0);
  const V a2 = a * a;
  V series = O::splat(-2.2213930853920414559e-8);
  series = series * a2 + O::splat(2.1923271344567640864e-7);
  series = series * a2 + O::splat(-2.1633474427786597099e-6);
  series = series * a2 + O::splat(2.1336045641601197157e-5);
  series = series * a2 + O::splat(-2.0998677248677248677e-4);
  series = series * a2 + O::splat(2.0502645502645502646e-3);
  series = series * a2 + O::splat(-1.9444444444444444444e-2);
  series = series * a2 + O::splat(1.6666666666666666667e-1);
  series = series * eta;
  const V closed_abs = one / a - O::splat(2.0) * e / (one - e * e);
  const V closed = O::select(O::lt(eta, O::splat(0.0)), O::splat(0.0) - closed_abs, closed_abs);
  return O::select(O::lt(a, O::splat(cb_series_bound<O>())), series, closed);
}

template <class O>
FUSEDVAE_HD typename O::V cb_log_normalizer(typename O::V eta) {
  return cb_log_normalizer_from<O>(O::abs(eta), exp_neg_abs<O>(eta));
}

template <class O>
FUSEDVAE_HD typename O::V cb_log_normalizer_grad(typename O::V eta) {
  return cb_log_normalizer_grad_from<O>(eta, O::abs(eta), exp_neg_abs<O>(eta));
}

template <class O>
FUSEDVAE_HD typename O::V cb_logits_loss(typename O::V eta, typename O::V t) {
  const typename O::V e = exp_neg_abs<O>(eta);
  return bce_logits_loss_from<O>(eta, t, e) - cb_log_normalizer_from<O>(O::abs(eta), e);
}

template <class O>
FUSEDVAE_HD typename O::V cb_logits_grad(typename O::V eta, typename O::V t) {
  const typename O::V e = exp_neg_abs<O>(eta);
  return sigmoid_from<O>(eta, e) - t - cb_log_normalizer_grad_from<O>(eta, O::abs(eta), e);
}

// With probabilities p the natural parameter is η = log p - log(1-p), both logs
// clamped at -100 like the BCE term, so η stays in [-100, 100].
template <class O>
FUSEDVAE_HD typename O::V cb_probs_loss(typename O::V p, typename O::V t) {
  const typename O::V eta = clamped_log<O>(p) - clamped_log1m<O>(p);
  return bce_probs_loss<O>(p, t) - cb_log_normalizer<O>(eta);
}

// dη/dp = 1/p + 1/(1-p), each term zero where its log is clamped.
template <class O>
FUSEDVAE_HD typename O::V cb_probs_grad(typename O::V p, typename O::V t) {
  using V = typename O::V;
  const V zero = O::splat(0.0);
  const V one = O::splat(1.0);
  const V lo = O::splat(kLogClampMin);
  const V log_p = O::log(p);
  const V log_1mp = O::log1p(zero - p);
  const V eta = clamped_log<O>(p) - clamped_log1m<O>(p);
  const V deta_dp = O::select(O::lt(log_p, lo), zero, one / p) +
                    O::select(O::lt(log_1mp, lo), zero, one / (one - p));
  return bce_probs_grad<O>(p, t) - cb_log_normalizer_grad<O>(eta) * deta_dp;
}

// ----------------------------------------------------------------- Gaussian --

template <class O>
FUSEDVAE_HD typename O::V squared_error(typename O::V x, typename O::V t) {
  const typename O::V diff = x - t;
  return diff * diff;
}

template <class O>
FUSEDVAE_HD typename O::V squared_error_grad(typename O::V x, typename O::V t) {
  return O::splat(2.0) * (x - t);
}

constexpr double kHalfLog2Pi = 0.91893853320467274178;

// Negative log density of N(t; x, σ²), σ = exp(s):
// ((x - t)/σ)²/2 + s + log(2π)/2. z = (x - t)·exp(-s) overflows only when σ
// does, so the loss is inf exactly where it should be.
template <class O>
FUSEDVAE_HD typename O::V gaussian_loss(typename O::V x, typename O::V t, typename O::V s) {
  const typename O::V z = (x - t) * O::exp(O::splat(0.0) - s);
  return O::splat(0.5) * z * z + s + O::splat(kHalfLog2Pi);
}

// ∂/∂x = (x - t)/σ², ∂/∂s = 1 - ((x - t)/σ)².
template <class O>
FUSEDVAE_HD void gaussian_grad(typename O::V x, typename O::V t, typename O::V s,
                               typename O::V* grad_x, typename O::V* grad_s) {
  const typename O::V inv_sigma = O::exp(O::splat(0.0) - s);
  const typename O::V z = (x - t) * inv_sigma;
  *grad_x = z * inv_sigma;
  *grad_s = O::splat(1.0) - z * z;
}

// -------------------------------------------------------------------- KL -----
// KL(N(μ, exp(lv)) || N(0, 1)) per latent dimension (Kingma & Welling 2014,
// App. B): ½(μ² + exp(lv) - 1 - lv). expm1 keeps it accurate near lv = 0.
template <class O>
FUSEDVAE_HD typename O::V kl_per_dim(typename O::V mu, typename O::V logvar) {
  return O::splat(0.5) * (mu * mu + O::expm1_approx(logvar) - logvar);
}

// ∂/∂μ = μ, ∂/∂lv = ½(exp(lv) - 1).
template <class O>
FUSEDVAE_HD typename O::V kl_grad_logvar(typename O::V logvar) {
  return O::splat(0.5) * O::expm1_approx(logvar);
}

// KL(N(μ, e^lv) || N(μp, e^lvp)) per dimension, the KL to a learned prior of
// hierarchical VAEs (Sønderby et al. 2016; Vahdat & Kautz 2020, NVAE):
// ½((μ - μp)²e^{-lvp} + e^{lv - lvp} - 1 - (lv - lvp)) = kl_per_dim(z, u) with
// z = (μ - μp)·e^{-lvp/2} and u = lv - lvp, which stays finite wherever the
// terms do (e^{-lvp} alone would overflow float32 below lvp ≈ -88).
template <class O>
FUSEDVAE_HD typename O::V kl_prior_z(typename O::V mu, typename O::V prior_mu,
                                     typename O::V prior_logvar) {
  return (mu - prior_mu) * O::exp_approx(O::splat(-0.5) * prior_logvar);
}
template <class O>
FUSEDVAE_HD typename O::V kl_per_dim_prior(typename O::V mu, typename O::V logvar,
                                           typename O::V prior_mu, typename O::V prior_logvar) {
  return kl_per_dim<O>(kl_prior_z<O>(mu, prior_mu, prior_logvar), logvar - prior_logvar);
}

// Its derivatives: ∂/∂μ = z·e^{-lvp/2} = -∂/∂μp, ∂/∂lv = ½ expm1(u),
// ∂/∂lvp = -½(expm1(u) + z²).
template <class O>
struct KlPriorGrad {
  typename O::V mu, logvar, prior_mu, prior_logvar;
};
template <class O>
FUSEDVAE_HD KlPriorGrad<O> kl_prior_grad(typename O::V mu, typename O::V logvar,
                                         typename O::V prior_mu, typename O::V prior_logvar) {
  using V = typename O::V;
  const V inv_sigma = O::exp_approx(O::splat(-0.5) * prior_logvar);
  const V z = (mu - prior_mu) * inv_sigma;
  const V d_mu = z * inv_sigma;
  const V half_expm1 = O::splat(0.5) * O::expm1_approx(logvar - prior_logvar);
  return {d_mu, half_expm1, O::splat(0.0) - d_mu,
          O::splat(0.0) - half_expm1 - O::splat(0.5) * z * z};
}

// ------------------------------------------------------------ likelihoods --
// Each likelihood is one traits type: its name, how it reads recon, whether it
// takes a log-scale s, and its per-element loss ℓ and derivatives. A likelihood
// with a scale also gives the closed form used when one s serves the whole
// batch: the kernels then sum a residual r(x, t) per sample, and
//   rec = rec_from_residual(R, s, N)   with R = Σ_i r(x_i, t_i),
// whose derivatives in R and s, and the maximum-likelihood log-scale given
// the mean residual, are here too. `Likelihoods` below lists them all: the one
// name table that ops.cpp, the kernels' dispatch and the Python checks read.

enum class ReconForm : int {
  kLogits = 0,         // logits (logits=True)
  kProbabilities = 1,  // probabilities (logits=False)
  kLocation = 2,       // the mean or median, beside a log-scale (logits ignored)
};

struct BernoulliLogits {
  static constexpr const char* kName = "bernoulli";
  static constexpr ReconForm kForm = ReconForm::kLogits;
  static constexpr bool kHasScale = false;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t) {
    return bce_logits_loss<O>(x, t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V grad(typename O::V x, typename O::V t) {
    return bce_logits_grad<O>(x, t);
  }
};

struct BernoulliProbs {
  static constexpr const char* kName = "bernoulli";
  static constexpr ReconForm kForm = ReconForm::kProbabilities;
  static constexpr bool kHasScale = false;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t) {
    return bce_probs_loss<O>(x, t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V grad(typename O::V x, typename O::V t) {
    return bce_probs_grad<O>(x, t);
  }
};

struct ContinuousBernoulliLogits {
  static constexpr const char* kName = "cbernoulli";
  static constexpr ReconForm kForm = ReconForm::kLogits;
  static constexpr bool kHasScale = false;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t) {
    return cb_logits_loss<O>(x, t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V grad(typename O::V x, typename O::V t) {
    return cb_logits_grad<O>(x, t);
  }
};

struct ContinuousBernoulliProbs {
  static constexpr const char* kName = "cbernoulli";
  static constexpr ReconForm kForm = ReconForm::kProbabilities;
  static constexpr bool kHasScale = false;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t) {
    return cb_probs_loss<O>(x, t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V grad(typename O::V x, typename O::V t) {
    return cb_probs_grad<O>(x, t);
  }
};

// N(t; x, σ²), σ = e^s. Residual (x - t)²: rec = R·e^{-2s}/2 + N·(s + log(2π)/2);
// maximum likelihood σ² = mean residual.
struct Gaussian {
  static constexpr const char* kName = "gaussian";
  static constexpr ReconForm kForm = ReconForm::kLocation;
  static constexpr bool kHasScale = true;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t, typename O::V s) {
    return gaussian_loss<O>(x, t, s);
  }
  template <class O>
  static FUSEDVAE_HD void grad(typename O::V x, typename O::V t, typename O::V s,
                               typename O::V* grad_x, typename O::V* grad_s) {
    gaussian_grad<O>(x, t, s, grad_x, grad_s);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V residual(typename O::V x, typename O::V t) {
    return squared_error<O>(x, t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V residual_grad(typename O::V x, typename O::V t) {
    return squared_error_grad<O>(x, t);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc rec_from_residual(Acc r, Acc s, Acc n) {
    using O = ScalarOps<Acc>;
    return Acc(0.5) * r * O::exp(Acc(-2) * s) + n * (s + Acc(kHalfLog2Pi));
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc rec_grad_residual(Acc s) {
    return Acc(0.5) * ScalarOps<Acc>::exp(Acc(-2) * s);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc rec_grad_scale(Acc r, Acc s, Acc n) {
    return n - r * ScalarOps<Acc>::exp(Acc(-2) * s);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc ml_log_scale(Acc mean_residual) {
    return Acc(0.5) * ScalarOps<Acc>::log(mean_residual);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc ml_log_scale_grad(Acc mean_residual) {
    return Acc(0.5) / mean_residual;
  }
};

constexpr double kLog2 = 0.69314718055994530942;

// sign(d), 0 at 0 and at NaN: torch.sign, the derivative torch.abs uses.
template <class O>
FUSEDVAE_HD typename O::V sign(typename O::V d) {
  using V = typename O::V;
  const V zero = O::splat(0.0);
  return O::select(O::gt(d, zero), O::splat(1.0), O::select(O::lt(d, zero), O::splat(-1.0), zero));
}

// Laplace(t; x, b), b = e^s: ℓ = |x - t|·e^{-s} + s + log 2. Residual |x - t|:
// rec = R·e^{-s} + N·(s + log 2); maximum likelihood b = mean residual.
struct Laplace {
  static constexpr const char* kName = "laplace";
  static constexpr ReconForm kForm = ReconForm::kLocation;
  static constexpr bool kHasScale = true;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t, typename O::V s) {
    return O::abs(x - t) * O::exp(O::splat(0.0) - s) + s + O::splat(kLog2);
  }
  // ∂/∂x = sign(x - t)·e^{-s}, ∂/∂s = 1 - |x - t|·e^{-s}.
  template <class O>
  static FUSEDVAE_HD void grad(typename O::V x, typename O::V t, typename O::V s,
                               typename O::V* grad_x, typename O::V* grad_s) {
    const typename O::V inv_b = O::exp(O::splat(0.0) - s);
    const typename O::V d = x - t;
    *grad_x = sign<O>(d) * inv_b;
    *grad_s = O::splat(1.0) - O::abs(d) * inv_b;
  }
  template <class O>
  static FUSEDVAE_HD typename O::V residual(typename O::V x, typename O::V t) {
    return O::abs(x - t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V residual_grad(typename O::V x, typename O::V t) {
    return sign<O>(x - t);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc rec_from_residual(Acc r, Acc s, Acc n) {
    return r * ScalarOps<Acc>::exp(-s) + n * (s + Acc(kLog2));
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc rec_grad_residual(Acc s) {
    return ScalarOps<Acc>::exp(-s);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc rec_grad_scale(Acc r, Acc s, Acc n) {
    return n - r * ScalarOps<Acc>::exp(-s);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc ml_log_scale(Acc mean_residual) {
    return ScalarOps<Acc>::log(mean_residual);
  }
  template <typename Acc>
  static FUSEDVAE_HD Acc ml_log_scale_grad(Acc mean_residual) {
    return Acc(1) / mean_residual;
  }
};

// The residual of a scaled likelihood as a two-argument per-element term: what
// the kernels sum (and differentiate) when one log-scale serves the batch.
template <class L>
struct ResidualOf {
  static constexpr ReconForm kForm = L::kForm;
  static constexpr bool kHasScale = false;
  template <class O>
  static FUSEDVAE_HD typename O::V loss(typename O::V x, typename O::V t) {
    return L::template residual<O>(x, t);
  }
  template <class O>
  static FUSEDVAE_HD typename O::V grad(typename O::V x, typename O::V t) {
    return L::template residual_grad<O>(x, t);
  }
};

template <class... Ls>
struct LikelihoodList {
  static constexpr int kSize = sizeof...(Ls);
};

// Every likelihood; a likelihood's id is its index here.
using Likelihoods = LikelihoodList<BernoulliLogits, BernoulliProbs, ContinuousBernoulliLogits,
                                   ContinuousBernoulliProbs, Gaussian, Laplace>;

// The name table: one row per likelihood, in id order.
struct LikelihoodInfo {
  const char* name;
  ReconForm form;
  bool has_scale;
};
template <class... Ls>
constexpr std::array<LikelihoodInfo, sizeof...(Ls)> make_likelihood_table(LikelihoodList<Ls...>) {
  return {{{Ls::kName, Ls::kForm, Ls::kHasScale}...}};
}
constexpr auto kLikelihoodTable = make_likelihood_table(Likelihoods{});

template <class L>
struct LikelihoodTag {
  using type = L;
};

// Calls f(LikelihoodTag<L>{}) for the likelihood of id `id` (nothing for an
// unknown id: ops.cpp only passes ids from the table). constexpr rather than
// __host__ __device__: nvcc (--expt-relaxed-constexpr) compiles it for the side
// each caller is on, so the host-only launchers that dispatch.h passes it need
// no device version (which nvcc would warn about for every instantiation).
template <class F, class L, class... Rest>
constexpr void visit_likelihood(int id, F&& f, LikelihoodList<L, Rest...>, int index = 0) {
  if (id == index) {
    f(LikelihoodTag<L>{});
    return;
  }
  if constexpr (sizeof...(Rest) > 0) visit_likelihood(id, f, LikelihoodList<Rest...>{}, index + 1);
}
template <class F>
constexpr void visit_likelihood(int id, F&& f) {
  visit_likelihood(id, f, Likelihoods{});
}

}  // namespace math
}  // namespace fusedvae
