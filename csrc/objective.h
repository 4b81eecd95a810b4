// The objective on per-sample vectors, shared by the CPU and CUDA backends:
// how the per-sample sums of the reconstruction loss and of the KL become
// (loss, rec, kl), and how the gradients of those outputs become the
// per-sample (and, with free bits, per-dimension) coefficients that the
// backward map kernels multiply the per-element derivatives by.
//
// With rec_b the reconstruction NLL and kl_b the KL of sample b (N data and J
// latent elements per sample), β the KL weight and λ the free bits:
//   kl_term_b = kl_b, or with λ > 0 the same K = Σ_j max(λ, mean_b kl_bj) for
//               every sample (Kingma et al. 2016, "Improved variational
//               inference with inverse autoregressive flow", eq. 15);
//   loss_b    = rec_b + β·kl_term_b, or for reduction "mean" rec_b/N + β·kl_term_b/J;
//   loss      = loss_b ("none"), Σ_b loss_b ("sum"), or mean_b loss_b.
// A scaled likelihood (Gaussian, Laplace) with one log-scale s for the whole
// batch is computed from its per-sample residual sums R_b (squared or absolute
// errors) by the likelihood's closed form (vae_math.h), e.g. for the Gaussian
// rec_b = R_b·e^{-2s}/2 + N·(s + log(2π)/2); for "optimal", s is the batch's
// maximum-likelihood log-scale softly clipped below (σ-VAE, Rybkin et al.
// 2021, "Simple and effective VAE training with calibrated decoders").
#pragma once

#include <cstdint>

#include "vae_math.h"

namespace fusedvae {

enum class Reduction : int { kBatchMean = 0, kSum = 1, kMean = 2, kNone = 3 };

// How a Gaussian's scale is given when it is one number for the whole batch.
enum class ScaleKind : int {
  kNone = 0,     // no shared scale: not a Gaussian, or a per-element log_scale
  kValue = 1,    // log σ, a number known on the host
  kTensor = 2,   // log σ, a 0-d tensor (learnable), read where the kernels run
  kOptimal = 3,  // the batch's maximum-likelihood scale (σ² = MSE; Laplace b = mean |x - t|)
};

// Lower soft clip on log σ for ScaleKind::kOptimal: s = s_min + softplus(log(MSE)/2 - s_min).
constexpr double kOptimalLogScaleMin = -6.0;
// torch.nn.functional.softplus's default threshold, above which softplus(u) = u.
constexpr double kSoftplusThreshold = 20.0;

// The scalars that turn per-sample sums into the objective.
struct Objective {
  int64_t batch;  // B
  int64_t n;      // data elements per sample
  int64_t j;      // latent elements per sample
  Reduction reduction;
  ScaleKind scale;
  double log_scale_value;  // ScaleKind::kValue
  double beta_value;       // β where no β tensor is given
  double free_bits;        // λ, nats per latent dimension; 0 for none
};

// The saved statistics of a forward (the op's fourth output, "aux"), in the
// accumulation type: [s, K, R_0..R_{B-1}, kl_0..kl_{B-1}, m_0..m_{J-1}],
// with s the shared log-scale used (0 where there is none), K the free-bits KL
// term (0 without free bits), R_b the per-sample residual sum of a shared-scale
// likelihood (0 otherwise), kl_b the per-sample KL and m_j = mean_b kl_bj (0
// without free bits).
struct AuxLayout {
  int64_t batch, j;
  static constexpr int64_t kLogScale = 0;
  static constexpr int64_t kFreeBitsTerm = 1;
  FUSEDVAE_HD int64_t residual() const { return 2; }
  FUSEDVAE_HD int64_t kl() const { return 2 + batch; }
  FUSEDVAE_HD int64_t kl_dim_mean() const { return 2 + 2 * batch; }
  FUSEDVAE_HD int64_t size() const { return 2 + 2 * batch + j; }
};

namespace objective {

FUSEDVAE_HD bool uses_shared_scale(const Objective& o) { return o.scale != ScaleKind::kNone; }

// torch.nn.functional.softplus and its derivative, threshold included.
template <typename Acc>
FUSEDVAE_HD Acc softplus(Acc u) {
  using O = math::ScalarOps<Acc>;
  return u > Acc(kSoftplusThreshold) ? u : O::log1p(O::exp(u));
}
template <typename Acc>
FUSEDVAE_HD Acc softplus_grad(Acc u) {
  using O = math::ScalarOps<Acc>;
  if (u > Acc(kSoftplusThreshold)) return Acc(1);
  const Acc z = O::exp(u);
  return z / (z + Acc(1));
}

// The shared-scale closed forms of the likelihood with id `likelihood`
// (math::Likelihoods), looked up at run time.
template <typename Acc>
struct SharedScaleTerms {
  Acc r, s, n;                               // in: residual sum, log-scale, elements
  Acc rec = 0, d_residual = 0, d_scale = 0;  // out: rec and its partials
  template <class Tag>
  FUSEDVAE_HD void operator()(Tag) {
    using L = typename Tag::type;
    // A sample of no elements (or of weight 0): rec is an empty sum, 0,
    // whatever s is (s of an empty batch's "optimal" scale is NaN).
    if (n == Acc(0)) return;
    if constexpr (L::kHasScale) {
      rec = L::template rec_from_residual<Acc>(r, s, n);
      d_residual = L::template rec_grad_residual<Acc>(s);
      d_scale = L::template rec_grad_scale<Acc>(r, s, n);
    }
  }
};

// n: the sample's elements, or with weights its weight sum W_b.
template <typename Acc>
FUSEDVAE_HD SharedScaleTerms<Acc> shared_scale_terms(int likelihood, Acc r, Acc s, Acc n) {
  SharedScaleTerms<Acc> terms{r, s, n};
  math::visit_likelihood(likelihood, terms);
  return terms;
}

template <typename Acc>
struct MaxLikelihoodScale {
  Acc mean;  // in: the batch's mean residual
  Acc log_scale = 0, grad = 0;
  template <class Tag>
  FUSEDVAE_HD void operator()(Tag) {
    using L = typename Tag::type;
    if constexpr (L::kHasScale) {
      log_scale = L::template ml_log_scale<Acc>(mean);
      grad = L::template ml_log_scale_grad<Acc>(mean);
    }
  }
};

// s* = s_min + softplus(u - s_min), u the maximum-likelihood log-scale given
// the mean residual, and d s* / d mean.
template <typename Acc>
FUSEDVAE_HD Acc optimal_log_scale(int likelihood, Acc mean_residual) {
  MaxLikelihoodScale<Acc> ml{mean_residual};
  math::visit_likelihood(likelihood, ml);
  const Acc s_min = Acc(kOptimalLogScaleMin);
  return s_min + softplus(ml.log_scale - s_min);
}
template <typename Acc>
FUSEDVAE_HD Acc optimal_log_scale_grad(int likelihood, Acc mean_residual) {
  MaxLikelihoodScale<Acc> ml{mean_residual};
  math::visit_likelihood(likelihood, ml);
  return softplus_grad(ml.log_scale - Acc(kOptimalLogScaleMin)) * ml.grad;
}

// What stands for the element count N of sample b in a shared-scale closed
// form: N, or with weights the sample's weight sum W_b.
template <typename Acc>
FUSEDVAE_HD Acc element_count(const void* weight_sums, int64_t stride, int64_t n, int64_t b) {
  return weight_sums == nullptr ? Acc(n) : static_cast<const Acc*>(weight_sums)[b * stride];
}

// max(λ, m), NaN kept (torch.clamp(m, min=λ)).
template <typename Acc>
FUSEDVAE_HD Acc free_bits_clamp(Acc m, Acc lambda) {
  return m < lambda ? lambda : m;
}
// Its derivative, where torch.clamp passes the gradient: m >= λ.
template <typename Acc>
FUSEDVAE_HD Acc free_bits_pass(Acc m, Acc lambda) {
  return m >= lambda ? Acc(1) : Acc(0);
}

// The weights of rec_b and kl_term_b in loss_b.
template <typename Acc>
FUSEDVAE_HD Acc rec_weight(const Objective& o) {
  return o.reduction == Reduction::kMean ? Acc(1) / Acc(o.n) : Acc(1);
}
template <typename Acc>
FUSEDVAE_HD Acc kl_weight(const Objective& o) {
  return o.reduction == Reduction::kMean ? Acc(1) / Acc(o.j) : Acc(1);
}

template <typename Acc>
FUSEDVAE_HD Acc sample_loss(const Objective& o, Acc rec, Acc kl_term, Acc beta) {
  return rec * rec_weight<Acc>(o) + beta * (kl_term * kl_weight<Acc>(o));
}

// d loss / d loss_b for the loss output's gradient g (sample b's for "none").
template <typename Acc>
FUSEDVAE_HD Acc sample_weight_of(const Objective& o, Acc g) {
  return o.reduction == Reduction::kNone || o.reduction == Reduction::kSum ? g : g / Acc(o.batch);
}

// d loss / d loss_b, given the gradient of the loss output: per sample for
// "none" (element b at stride `stride`), else one number.
template <typename Acc>
FUSEDVAE_HD Acc sample_weight(const Objective& o, const Acc* grad_loss, int64_t stride, int64_t b) {
  if (grad_loss == nullptr) return Acc(0);
  return sample_weight_of(o, grad_loss[o.reduction == Reduction::kNone ? b * stride : 0]);
}

// A [B] upstream gradient (of rec or kl) at sample b; 0 where none arrived.
template <typename Acc>
FUSEDVAE_HD Acc per_sample_grad(const Acc* grad, int64_t stride, int64_t b) {
  return grad == nullptr ? Acc(0) : grad[b * stride];
}

}  // namespace objective

// The upstream gradients of (loss, rec, kl), each null where none arrived, and
// each with the stride of its [B] vector (0 where it is expanded from one
// number; grad_loss's is ignored unless the reduction is "none").
struct OutputGrads {
  const void* loss;
  const void* rec;
  const void* kl;
  int64_t loss_stride, rec_stride, kl_stride;
};

namespace objective {

// c_b = d loss/d rec_b·(the loss's gradient) + the gradient of rec_b: the
// coefficient of sample b's ∂rec_b/∂recon in recon's gradient.
template <typename Acc>
FUSEDVAE_HD Acc rec_coefficient(const Objective& o, const OutputGrads& g, int64_t b) {
  return sample_weight(o, static_cast<const Acc*>(g.loss), g.loss_stride, b) * rec_weight<Acc>(o) +
         per_sample_grad(static_cast<const Acc*>(g.rec), g.rec_stride, b);
}

// c_b for loss.backward() (a loss gradient of 1 and nothing else), the same
// for every sample: the coefficient of vae_loss_and_grad's gradient.
template <typename Acc>
FUSEDVAE_HD Acc unit_rec_coefficient(const Objective& o) {
  return sample_weight_of(o, Acc(1)) * rec_weight<Acc>(o);
}

}  // namespace objective

}  // namespace fusedvae
