// The discretized mixture of logistics (PixelCNN++, Salimans et al. 2017) for
// one pixel: its negative log-likelihood and the gradient of that with respect
// to the pixel's K·(1 + 3C) parameters. One definition, a template over the
// ops policy of vae_math.h: the CUDA kernels run it on one pixel per 1, 2 or 4
// threads (ScalarOps; cuda/dmol.cu splits the components and merges their
// log-sum-exps), the CPU kernels on a vector of consecutive pixels per lane
// (cpu/vec_ops.h). Branches are selects, so both compute the same thing.
//
// Layout (fusedvae.discretized_mix_logistic_nll): parameter j of a pixel is
// read as p(j); j < K are the mixture logits π_k; for colour channel c,
// K + c·R·K + k is its mean, K + c·R·K + K + k its log-scale and, for RGB
// (R = 3), K + c·R·K + 2K + k its raw coupling coefficient row c (in
// PixelCNN++'s order: green-on-red, blue-on-red, blue-on-green). With one
// channel R = 2.
//
// With s = exp(-max(log_scale, log_scale_min)), h the bin half-width and the
// coupled mean m, a channel's log bin probability is, for u = s(x - m + h),
// l = s(x - m - h):
//   x < -0.999: log σ(u);   x > 0.999: log(1 - σ(l)) = log σ(-l);
//   otherwise: log(σ(u) - σ(l)) = log σ(u) + log σ(-l) + log(1 - e^{l-u}),
// exact where PixelCNN++ falls back to the mid-bin density (the identity
// σ(u) - σ(l) = σ(u)·σ(-l)·(1 - e^{l-u})). The pixel's log-likelihood is
// logsumexp_k(log_softmax(π)_k + Σ_c log P_kc), taken in one pass with a
// running maximum, so no per-pixel array is needed for any K; the CPU holds the
// K terms of a mixture up to 16 components and takes the log-sum-exps over
// them (log_sum_exp_held), which gives softmax(π) and p(k | pixel) as shares.
#pragma once

#include <cstdint>
#include <type_traits>

#include "vae_math.h"

namespace fusedvae {
namespace dmol {

// Edges of PixelCNN++'s first and last bins.
constexpr double kEdge = 0.999;

template <class O>
struct Pixel {
  using V = typename O::V;
  int channels;  // 1 or 3
  int64_t k;     // mixture components
  V x[3];        // the pixel's channels, in [-1, 1]
  V half_width;  // 1 / (2^bits - 1)
  V log_scale_min;
};

// f(c) for each colour channel c of px, c a compile-time constant
// (std::integral_constant): arrays indexed by it stay in registers. A GPU
// thread's loop over the run-time channel count indexed them at run time,
// which puts them in local memory.
template <class O, class F>
FUSEDVAE_ALWAYS_INLINE void for_each_channel(const Pixel<O>& px, const F& f) {
  f(std::integral_constant<int, 0>{});
  if (px.channels == 3) {
    f(std::integral_constant<int, 1>{});
    f(std::integral_constant<int, 2>{});
  }
}

// Running log-sum-exp: `max` and Σ e^{v - max}. NaN in gives NaN.
template <class O>
struct LogSumExp {
  using V = typename O::V;
  V max;
  V sum;
  FUSEDVAE_ALWAYS_INLINE void start(V v) {
    max = v;
    sum = O::splat(1.0);
  }
  FUSEDVAE_ALWAYS_INLINE void add(V v) {
    // One exponential: e^{-|v - max|} scales the old sum when v is the new
    // maximum and is the new term otherwise (e^0 = 1 exactly on both sides).
    const auto greater = O::gt(v, max);
    const V e = O::exp_nonpositive(O::splat(0.0) - O::abs(v - max));
    sum = O::select(greater, sum * e + O::splat(1.0), sum + e);
    max = O::select(greater, v, max);
  }
  // Takes in another running log-sum-exp of other terms (both non-empty). The
  // result does not depend on which side is which, so threads that exchange
  // theirs end with the same bits.
  FUSEDVAE_ALWAYS_INLINE void merge(V other_max, V other_sum) {
    const auto greater = O::gt(other_max, max);
    const V e = O::exp_nonpositive(O::splat(0.0) - O::abs(other_max - max));
    sum = O::select(greater, sum * e + other_sum, sum + other_sum * e);
    max = O::select(greater, other_max, max);
  }
  FUSEDVAE_ALWAYS_INLINE V value() const { return max + O::log_approx(sum); }
};

// One channel of one component: log P = outside + log(argument) and, with
// `want_grad`, its derivatives with respect to the coupled mean and the raw
// log-scale. The logs of a component's channels are taken together
// (channels_log_prob).
template <class O>
struct ChannelTerm {
  typename O::V outside;
  typename O::V argument;
  typename O::V d_mean;
  typename O::V d_log_scale;
};

// Σ_c log P_c over a component's channels: one log of the product of their
// arguments, each in (0, 1] (a vector policy evaluates log_product3 with one
// polynomial where three logs took three).
template <class O>
FUSEDVAE_ALWAYS_INLINE typename O::V channels_log_prob(const ChannelTerm<O>* terms, int channels) {
  if (channels == 3) {
    return (terms[0].outside + terms[1].outside + terms[2].outside) +
           O::log_product3(terms[0].argument, terms[1].argument, terms[2].argument);
  }
  return terms[0].outside + O::log_approx(terms[0].argument);
}

// The channels of one component, N = 1 or 3, each step taken for every channel
// before the next: the channels are independent, and a CPU overlaps the steps of
// one with those of the others only where they lie close in the code. (Two
// components at once, six chains, ran slower: registers spill.)
template <int N, class O>
FUSEDVAE_ALWAYS_INLINE void channel_terms(const typename O::V* x, const typename O::V* mean,
                                          const typename O::V* raw_log_scale,
                                          typename O::V half_width, typename O::V log_scale_min,
                                          bool want_grad, ChannelTerm<O>* out) {
  using V = typename O::V;
  using Mask = decltype(O::lt(half_width, half_width));
  const V zero = O::splat(0.0);
  const V one = O::splat(1.0);
  V inv_scale[N], u[N], l[N], e_u[N], e_l[N], expm1_neg_width[N], inv_both[N], inv_u[N], inv_l[N];
  Mask below[N], above[N];
  for (int c = 0; c < N; ++c) {
    // clamp(min=): NaN stays NaN; the gradient is zero below the bound and at it
    // (as fusedvae.reference writes it out; torch.clamp's own changed at the bound in 2.14).
    const V log_scale =
        O::select(O::lt(raw_log_scale[c], log_scale_min), log_scale_min, raw_log_scale[c]);
    inv_scale[c] = O::exp_approx(zero - log_scale);
    const V centered = x[c] - mean[c];
    u[c] = inv_scale[c] * (centered + half_width);
    l[c] = inv_scale[c] * (centered - half_width);
  }
  // σ(±u) and σ(±l) from e = e^{-|v|} and 1/(1 + e), both reciprocals from one
  // division; the three logs of the interior, log σ(u) + log σ(-l) +
  // log(1 - e^{-w}), as one: min(u, 0) + min(-l, 0) + log(σ(|u|)·σ(|l|)·(1 -
  // e^{-w})), whose argument stays a normal float for any scale below e^80 (above,
  // a subnormal one, whose log is still finite).
  // w = u - l = 2·h·s > 0.
  for (int c = 0; c < N; ++c) {
    e_u[c] = O::exp_nonpositive(zero - O::abs(u[c]));
    e_l[c] = O::exp_nonpositive(zero - O::abs(l[c]));
    expm1_neg_width[c] = O::expm1_nonpositive(zero - (u[c] - l[c]));  // e^{-w} - 1, in (-1, 0)
  }
  for (int c = 0; c < N; ++c) {
    const V one_plus_e_u = one + e_u[c];
    const V one_plus_e_l = one + e_l[c];
    inv_both[c] = O::divide_1_4(one, one_plus_e_u * one_plus_e_l);  // σ(|u|)·σ(|l|)
    inv_u[c] = inv_both[c] * one_plus_e_l;                          // σ(|u|)
    inv_l[c] = inv_both[c] * one_plus_e_u;                          // σ(|l|)
    below[c] = O::lt(x[c], O::splat(-kEdge));
    above[c] = O::gt(x[c], O::splat(kEdge));
  }
  for (int c = 0; c < N; ++c) {
    const V min_u = O::select(O::lt(u[c], zero), u[c], zero);
    const V min_neg_l = O::select(O::gt(l[c], zero), zero - l[c], zero);
    out[c].argument =
        O::select(below[c], inv_u[c],
                  O::select(above[c], inv_l[c], inv_both[c] * (zero - expm1_neg_width[c])));
    out[c].outside = O::select(below[c], min_u, O::select(above[c], min_neg_l, min_u + min_neg_l));
  }
  if (want_grad) {
    for (int c = 0; c < N; ++c) {
      // With a = ∂ log P/∂u and b = ∂ log P/∂l, the mean's derivative is
      // -s·(a + b) and the raw log-scale's -(u·a + l·b). In the interior
      // d/dw log(1 - e^{-w}) = 1/expm1(w) enters a and -b: it cancels in a + b
      // and gives w/expm1(w) = w·(1 + m)/(-m), m = expm1(-w), in u·a + l·b.
      // Taken apart, 1/expm1(w) is huge for narrow bins and its two terms
      // cancel to no bits (it overflows for w below 2^-128, scales above e^80).
      const V sig_neg_u = O::select(O::gt(u[c], zero), e_u[c] * inv_u[c], inv_u[c]);  // σ(-u)
      const V sig_l = O::select(O::ge(l[c], zero), inv_l[c], e_l[c] * inv_l[c]);      // σ(l)
      const V u_term = u[c] * sig_neg_u;
      const V l_term = l[c] * sig_l;
      const V w_over_expm1 =
          (u[c] - l[c]) * (one + expm1_neg_width[c]) / (zero - expm1_neg_width[c]);
      const V a_plus_b =
          O::select(below[c], sig_neg_u, O::select(above[c], zero - sig_l, sig_neg_u - sig_l));
      const V weighted = O::select(
          below[c], u_term, O::select(above[c], zero - l_term, u_term - l_term + w_over_expm1));
      out[c].d_mean = zero - inv_scale[c] * a_plus_b;
      out[c].d_log_scale = O::select(O::gt(raw_log_scale[c], log_scale_min), zero - weighted, zero);
    }
  }
}

// The coupled mean of channel c in component k: green and blue move with the
// pixel's red (and green) values by tanh of the coupling coefficients.
template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE typename O::V coupled_mean(const Pixel<O>& px, const Read& p, int c,
                                                  int64_t k, const typename O::V* tanh_rows) {
  const int64_t kk = px.k;
  const int rows = px.channels == 3 ? 3 : 2;
  typename O::V mean = p(kk + c * rows * kk + k);
  if (c == 1) mean = mean + tanh_rows[0] * px.x[0];
  if (c == 2) mean = mean + tanh_rows[1] * px.x[0] + tanh_rows[2] * px.x[1];
  return mean;
}

template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE void coupling_rows(const Pixel<O>& px, const Read& p, int64_t k,
                                          typename O::V* tanh_rows) {
  const int64_t kk = px.k;
  for (int row = 0; row < 3; ++row) {
    tanh_rows[row] =
        px.channels == 3 ? O::tanh_approx(p(kk + row * 3 * kk + 2 * kk + k)) : O::splat(0.0);
  }
}

// channel_terms for component k, given tanh of its coupling rows. A GPU
// thread hides latency with other warps, not by interleaving: it takes one
// channel at a time, as it always has, which keeps its register use.
template <int N, class O, typename Read>
FUSEDVAE_ALWAYS_INLINE void component_channels(const Pixel<O>& px, const Read& p, int64_t k,
                                               const typename O::V* tanh_rows, bool want_grad,
                                               ChannelTerm<O>* out) {
  const int64_t kk = px.k;
  const int rows = px.channels == 3 ? 3 : 2;
  typename O::V mean[N], raw_log_scale[N];
  for (int c = 0; c < N; ++c) {
    mean[c] = coupled_mean(px, p, c, k, tanh_rows);
    raw_log_scale[c] = p(kk + c * rows * kk + kk + k);
  }
  channel_terms<N, O>(px.x, mean, raw_log_scale, px.half_width, px.log_scale_min, want_grad, out);
}

template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE void component_channels(const Pixel<O>& px, const Read& p, int64_t k,
                                               const typename O::V* tanh_rows, bool want_grad,
                                               ChannelTerm<O>* out) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  const int64_t kk = px.k;
  const int rows = px.channels == 3 ? 3 : 2;
  for_each_channel(px, [&](auto c) {
    const typename O::V mean = coupled_mean(px, p, c, k, tanh_rows);
    const typename O::V raw_log_scale = p(kk + c * rows * kk + kk + k);
    channel_terms<1, O>(&px.x[c], &mean, &raw_log_scale, px.half_width, px.log_scale_min, want_grad,
                        &out[c]);
  });
#else
  if (px.channels == 3) {
    component_channels<3>(px, p, k, tanh_rows, want_grad, out);
  } else {
    component_channels<1>(px, p, k, tanh_rows, want_grad, out);
  }
#endif
}

// Σ_c log P_kc for component k.
template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE typename O::V component_log_prob(const Pixel<O>& px, const Read& p,
                                                        int64_t k) {
  using V = typename O::V;
  V tanh_rows[3];
  coupling_rows(px, p, k, tanh_rows);
  ChannelTerm<O> terms[3];
  component_channels(px, p, k, tanh_rows, false, terms);
  return channels_log_prob(terms, px.channels);
}

// logsumexp_k π_k, the log-softmax normaliser of the logits.
template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE typename O::V logit_normalizer(const Pixel<O>& px, const Read& p) {
  LogSumExp<O> lse;
  lse.start(p(0));
  for (int64_t k = 1; k < px.k; ++k) lse.add(p(k));
  return lse.value();
}

// The running log-sum-exp over components first, first + step, ... (first <
// K) of log_softmax(π)_k + Σ_c log P_kc, given the logits' normaliser. A CUDA
// pixel split over threads merges those of its threads.
template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE LogSumExp<O> components_log_sum_exp(const Pixel<O>& px, const Read& p,
                                                           typename O::V norm, int64_t first,
                                                           int64_t step) {
  LogSumExp<O> lse;
  lse.start(p(first) - norm + component_log_prob(px, p, first));
  for (int64_t k = first + step; k < px.k; k += step) {
    lse.add(p(k) - norm + component_log_prob(px, p, k));
  }
  return lse;
}

// log p(pixel), given the logits' normaliser.
template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE typename O::V pixel_log_likelihood(const Pixel<O>& px, const Read& p,
                                                          typename O::V norm) {
  return components_log_sum_exp(px, p, norm, 0, 1).value();
}

// log Σ_k e^{v_k} over n >= 1 values held in an array, leaving e^{v_k - m} (m
// the largest v_k) in e[k] and their sum in *sum: v_k's share of the total is
// e[k] / *sum, where a running LogSumExp, whose terms are scaled by maxima
// found later, would take a second exponential for it. NaN gives NaN.
template <class O>
FUSEDVAE_ALWAYS_INLINE typename O::V log_sum_exp_held(const typename O::V* v, int64_t n,
                                                      typename O::V* e, typename O::V* sum) {
  using V = typename O::V;
  V max = v[0];
  for (int64_t k = 1; k < n; ++k) max = O::select(O::gt(v[k], max), v[k], max);
  V total = O::splat(0.0);
  for (int64_t k = 0; k < n; ++k) {
    e[k] = O::exp_nonpositive(v[k] - max);
    total = total + e[k];
  }
  *sum = total;
  return max + O::log_approx(total);
}

// logsumexp_k π_k over the pixel's logits held in an array (n <= kCached),
// leaving e^{π_k - max} in e[k] and their sum in *sum: log_sum_exp_held on
// them, for pixel_nll and pixel_nll_backward alike.
template <int kCached, class O, typename Read>
FUSEDVAE_ALWAYS_INLINE typename O::V held_logit_normalizer(const Pixel<O>& px, const Read& p,
                                                           typename O::V* e, typename O::V* sum) {
  typename O::V logits[kCached];
  for (int64_t k = 0; k < px.k; ++k) logits[k] = p(k);
  return log_sum_exp_held<O>(logits, px.k, e, sum);
}

// -log p(pixel). With at most kCached components, the two log-sum-exps are
// taken over values held in arrays, as pixel_nll_backward takes them (the
// same bits); otherwise running.
template <int kCached, class O, typename Read>
FUSEDVAE_HD typename O::V pixel_nll(const Pixel<O>& px, const Read& p) {
  if constexpr (kCached > 0) {
    if (px.k <= kCached) {
      typename O::V held[kCached], e[kCached], sum;
      const typename O::V norm = held_logit_normalizer<kCached>(px, p, e, &sum);
      for (int64_t k = 0; k < px.k; ++k) held[k] = p(k) - norm + component_log_prob(px, p, k);
      return O::splat(0.0) - log_sum_exp_held<O>(held, px.k, e, &sum);
    }
  }
  return O::splat(0.0) - pixel_log_likelihood(px, p, logit_normalizer(px, p));
}

// The gradient of one component: log_softmax(π)_k + Σ_c log P_kc and, per
// channel, ∂ log P_kc/∂(coupled mean), ∂/∂(raw log-scale) and tanh of the
// coupling rows.
template <class O>
struct ComponentGrad {
  using V = typename O::V;
  V log_joint;
  V d_mean[3];
  V d_log_scale[3];
  V tanh_rows[3];
};

template <class O, typename Read>
FUSEDVAE_ALWAYS_INLINE void component_grad(const Pixel<O>& px, const Read& p, int64_t k,
                                           typename O::V norm, ComponentGrad<O>* out) {
  coupling_rows(px, p, k, out->tanh_rows);
  ChannelTerm<O> terms[3];
  component_channels(px, p, k, out->tanh_rows, true, terms);
  for_each_channel(px, [&](auto c) {
    out->d_mean[c] = terms[c].d_mean;
    out->d_log_scale[c] = terms[c].d_log_scale;
  });
  out->log_joint = p(k) - norm + channels_log_prob(terms, px.channels);
}

// The gradient's scale g: the output's gradient, or UnitScale for g = 1 (the
// CPU's forward computes that gradient, and its autograd node multiplies by the
// output's gradient later: g * (value) either way, so both give the same bits).
struct UnitScale {};
template <class V>
FUSEDVAE_ALWAYS_INLINE V scaled(const V& g, const V& value) {
  return g * value;
}
template <class V>
FUSEDVAE_ALWAYS_INLINE V scaled(UnitScale, const V& value) {
  return value;
}

// Writes component k's gradients, given softmax(π)_k and r_k = p(k | pixel).
template <class O, typename G, typename Write>
FUSEDVAE_ALWAYS_INLINE void write_component_grad(const Pixel<O>& px, int64_t k, const G& g,
                                                 const ComponentGrad<O>& cg, typename O::V softmax,
                                                 typename O::V r, const Write& write) {
  using V = typename O::V;
  const int64_t kk = px.k;
  const int rows = px.channels == 3 ? 3 : 2;
  // d(-log p)/d log P_kc = -r_k; d(-log p)/dπ_k = softmax(π)_k - r_k.
  const V minus_r = O::splat(0.0) - r;
  write(k, scaled(g, V(softmax - r)));
  for_each_channel(px, [&](auto c) {
    write(kk + c * rows * kk + k, scaled(g, V(minus_r * cg.d_mean[c])));
    write(kk + c * rows * kk + kk + k, scaled(g, V(minus_r * cg.d_log_scale[c])));
  });
  if (px.channels == 3) {
    // Row 0 (green-on-red) moves channel 1's mean by x_r; rows 1 and 2 channel 2's by x_r, x_g.
    const V d_row[3] = {cg.d_mean[1] * px.x[0], cg.d_mean[2] * px.x[0], cg.d_mean[2] * px.x[1]};
    const V one = O::splat(1.0);
    for (int row = 0; row < 3; ++row) {
      write(kk + row * 3 * kk + 2 * kk + k,
            scaled(g, V(minus_r * d_row[row] * (one - cg.tanh_rows[row] * cg.tanh_rows[row]))));
    }
  }
}

// The same, given the logits' normaliser and log p(pixel): softmax(π)_k and
// r_k by an exponential each. Both exponents are <= 0 (up to rounding):
// π_k <= norm, log p(k, pixel) <= log p(pixel).
template <class O, typename Read, typename G, typename Write>
FUSEDVAE_ALWAYS_INLINE void write_component_grad(const Pixel<O>& px, const Read& p, int64_t k,
                                                 typename O::V norm, const G& g,
                                                 const ComponentGrad<O>& cg, typename O::V log_like,
                                                 const Write& write) {
  write_component_grad(px, k, g, cg, O::exp_nonpositive(p(k) - norm),
                       O::exp_nonpositive(cg.log_joint - log_like), write);
}

// Writes the gradients of components first, first + step, ... (first < K),
// given the logits' normaliser and log p(pixel): one evaluation of each.
template <class O, typename Read, typename G, typename Write>
FUSEDVAE_ALWAYS_INLINE void components_backward(const Pixel<O>& px, const Read& p,
                                                typename O::V norm, typename O::V log_like,
                                                int64_t first, int64_t step, const G& g,
                                                const Write& write) {
  for (int64_t k = first; k < px.k; k += step) {
    ComponentGrad<O> cg;
    component_grad(px, p, k, norm, &cg);
    write_component_grad(px, p, k, norm, g, cg, log_like, write);
  }
}

// Calls write(j, g · ∂(-log p(pixel))/∂p(j)) for every parameter j and returns
// log p(pixel). With at most kCached components each is evaluated once and
// kept until log p(pixel) is known; with more (or kCached = 0, where keeping
// them costs more than evaluating twice, as in a GPU thread's registers) a
// first pass forms log p(pixel) and a second the gradients, unless `nll` (the
// forward's -log p(pixel), bitwise what the first pass would give) is given.
template <int kCached, class O, typename Read, typename G, typename Write>
FUSEDVAE_HD typename O::V pixel_nll_backward(const Pixel<O>& px, const Read& p, const G& g,
                                             const Write& write,
                                             const typename O::V* nll = nullptr) {
  using V = typename O::V;
  if constexpr (kCached > 0) {
    if (px.k <= kCached) {
      // The log-sum-exps of pixel_nll<kCached>, whose exponentials give
      // softmax(π)_k and r_k as shares.
      V softmax[kCached], logit_sum;
      const V norm = held_logit_normalizer<kCached>(px, p, softmax, &logit_sum);
      ComponentGrad<O> cache[kCached];
      V log_joint[kCached], share[kCached], joint_sum;
      for (int64_t k = 0; k < px.k; ++k) {
        component_grad(px, p, k, norm, &cache[k]);
        log_joint[k] = cache[k].log_joint;
      }
      const V log_like = log_sum_exp_held<O>(log_joint, px.k, share, &joint_sum);
      const V one = O::splat(1.0);
      const V inv_logit_sum = one / logit_sum;
      const V inv_joint_sum = one / joint_sum;
      for (int64_t k = 0; k < px.k; ++k) {
        write_component_grad(px, k, g, cache[k], softmax[k] * inv_logit_sum,
                             share[k] * inv_joint_sum, write);
      }
      return log_like;
    }
  }
  const V norm = logit_normalizer(px, p);
  const V log_like = nll != nullptr ? O::splat(0.0) - *nll : pixel_log_likelihood(px, p, norm);
  components_backward(px, p, norm, log_like, 0, 1, g, write);
  return log_like;
}

}  // namespace dmol
}  // namespace fusedvae
