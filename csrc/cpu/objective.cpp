// The objective on the CPU: the per-element kernels of the selected build
// (kernels()) for the per-sample sums and the gradients, and objective.h's
// formulas over the [batch]- and [latent]-sized vectors in between, as plain
// loops on the calling thread (no torch operator, no allocation by torch).
#include <cmath>
#include <vector>

#include "../kernels.h"

namespace fusedvae {
namespace cpu {
namespace {

using namespace objective;

template <typename Acc>
Acc beta_of(const ObjectiveProblem& p) {
  return p.beta != nullptr ? *static_cast<const Acc*>(p.beta) : Acc(p.objective.beta_value);
}

// kl[b] = Σ_j kl_bj and, where dim_mean is not null, dim_mean[j] = mean_b kl_bj,
// from the per-dimension terms, each summed in index order.
template <typename Acc>
void kl_sums(const KlProblem& p, Acc* kl, Acc* dim_mean) {
  if (dim_mean == nullptr) {
    kernels().gaussian_kl_forward(p, /*per_dim=*/false, kl);
    return;
  }
  const int64_t batch = p.batch, latent = p.latent_dim;
  std::vector<Acc> per_dim(static_cast<size_t>(batch * latent));
  kernels().gaussian_kl_forward(p, /*per_dim=*/true, per_dim.data());
  for (int64_t j = 0; j < latent; ++j) dim_mean[j] = Acc(0);
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0;
    for (int64_t j = 0; j < latent; ++j) {
      sum += per_dim[b * latent + j];
      dim_mean[j] += per_dim[b * latent + j];
    }
    kl[b] = static_cast<Acc>(sum);
  }
  for (int64_t j = 0; j < latent; ++j) dim_mean[j] /= Acc(batch);
}

// grad_recon: null, or where the gradient of the loss for a loss gradient of 1
// goes, computed in the same pass as rec (the scale not shared:
// objective_forward_with_grad). Its coefficient, unit_rec_coefficient, is the
// backward's rec_coefficient for that gradient, so the two round alike.
template <typename Acc>
void forward(const ObjectiveProblem& p, Acc* loss, Acc* rec, Acc* kl, Acc* aux, void* grad_recon) {
  const Objective& o = p.objective;
  const int64_t batch = o.batch;
  const AuxLayout layout{batch, o.j};
  for (int64_t k = 0; k < layout.size(); ++k) aux[k] = Acc(0);

  if (grad_recon != nullptr) {
    kernels().recon_loss_forward_with_grad(p.recon, rec, grad_recon, unit_rec_coefficient<Acc>(o));
  } else {
    kernels().recon_loss_forward(p.recon, rec);
  }
  const bool free_bits = o.free_bits > 0;
  Acc* mean = aux + layout.kl_dim_mean();
  kl_sums<Acc>(p.kl, kl, free_bits ? mean : nullptr);
  if (free_bits) {
    Acc total = 0;
    for (int64_t j = 0; j < o.j; ++j) total += free_bits_clamp(mean[j], Acc(o.free_bits));
    aux[AuxLayout::kFreeBitsTerm] = total;
  }
  for (int64_t b = 0; b < batch; ++b) aux[layout.kl() + b] = kl[b];

  if (uses_shared_scale(o)) {
    Acc s = 0;
    if (o.scale == ScaleKind::kValue) {
      s = Acc(o.log_scale_value);
    } else if (o.scale == ScaleKind::kTensor) {
      s = *static_cast<const Acc*>(p.log_scale_scalar);
    } else {
      // The batch's (weighted) mean residual.
      Acc total = 0, count = 0;
      for (int64_t b = 0; b < batch; ++b) {
        total += rec[b];
        count += element_count<Acc>(p.weight_sums, p.weight_sums_stride, o.n, b);
      }
      s = optimal_log_scale(p.recon.likelihood, total / count);
    }
    aux[AuxLayout::kLogScale] = s;
    for (int64_t b = 0; b < batch; ++b) {
      aux[layout.residual() + b] = rec[b];
      const Acc n = element_count<Acc>(p.weight_sums, p.weight_sums_stride, o.n, b);
      rec[b] = shared_scale_terms(p.recon.likelihood, rec[b], s, n).rec;
    }
  }

  const Acc beta = beta_of<Acc>(p);
  Acc total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const Acc kl_term = free_bits ? aux[AuxLayout::kFreeBitsTerm] : kl[b];
    const Acc value = sample_loss(o, rec[b], kl_term, beta);
    if (o.reduction == Reduction::kNone) {
      loss[b] = value;
    } else {
      total += value;
    }
  }
  if (o.reduction == Reduction::kSum) loss[0] = total;
  if (o.reduction == Reduction::kBatchMean || o.reduction == Reduction::kMean) {
    loss[0] = total / Acc(batch);
  }
}

template <typename Acc>
void backward(const ObjectiveProblem& p, const OutputGrads& g, const Acc* aux,
              const ObjectiveGrads& out) {
  const Objective& o = p.objective;
  const int64_t batch = o.batch;
  const AuxLayout layout{batch, o.j};
  const Acc* grad_loss = static_cast<const Acc*>(g.loss);
  const Acc beta = beta_of<Acc>(p);
  const bool free_bits = o.free_bits > 0;

  // Per-sample coefficients of ∂rec_b and ∂kl_b, and the scalar gradients.
  std::vector<Acc> rec_coef(static_cast<size_t>(batch)), kl_coef(static_cast<size_t>(batch));
  Acc weight_sum = 0, grad_beta = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const Acc w = sample_weight(o, grad_loss, g.loss_stride, b);
    weight_sum += w;
    rec_coef[b] = rec_coefficient<Acc>(o, g, b);
    const Acc kl_term = free_bits ? aux[AuxLayout::kFreeBitsTerm] : aux[layout.kl() + b];
    grad_beta += w * kl_weight<Acc>(o) * kl_term;
    kl_coef[b] = (free_bits ? Acc(0) : w * beta * kl_weight<Acc>(o)) +
                 per_sample_grad(static_cast<const Acc*>(g.kl), g.kl_stride, b);
  }
  if (out.beta != nullptr) *static_cast<Acc*>(out.beta) = grad_beta;

  if (uses_shared_scale(o)) {
    // rec_b = f(R_b, s): ∂loss/∂x = c_b·∂f/∂R_b·∂r/∂x, plus for "optimal" the
    // path through s: Σ_b c_b·∂f/∂s · ds/dmean · ∂r/∂x / Σ_b N_b (N_b the
    // sample's element count or weight sum). The kernel multiplies ∂r/∂x (the
    // residual's derivative, times the element's weight) by the coefficient.
    const Acc s = aux[AuxLayout::kLogScale];
    const int likelihood = p.recon.likelihood;
    Acc grad_s = 0, residual_sum = 0, count = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const Acc r = aux[layout.residual() + b];
      const Acc n = element_count<Acc>(p.weight_sums, p.weight_sums_stride, o.n, b);
      grad_s += rec_coef[b] * shared_scale_terms(likelihood, r, s, n).d_scale;
      residual_sum += r;
      count += n;
    }
    if (out.log_scale != nullptr) *static_cast<Acc*>(out.log_scale) = grad_s;
    Acc through_scale = 0;
    if (o.scale == ScaleKind::kOptimal) {
      through_scale = grad_s * optimal_log_scale_grad(likelihood, residual_sum / count) / count;
    }
    const Acc d_residual = shared_scale_terms(likelihood, Acc(0), s, Acc(1)).d_residual;
    for (int64_t b = 0; b < batch; ++b) rec_coef[b] = rec_coef[b] * d_residual + through_scale;
  }
  if (out.recon_coef != nullptr) {
    Acc* coef = static_cast<Acc*>(out.recon_coef);
    const Acc unit = unit_rec_coefficient<Acc>(o);
    for (int64_t b = 0; b < batch; ++b) coef[b] = rec_coef[b] / unit;
  } else if (out.recon != nullptr) {
    kernels().recon_loss_backward(p.recon, rec_coef.data(), out.recon,
                                  uses_shared_scale(o) ? nullptr : out.log_scale);
  }
  if (out.mu != nullptr) {
    std::vector<Acc> dim_coef;
    if (free_bits) {
      const Acc scale = weight_sum * beta * kl_weight<Acc>(o) / Acc(batch);
      dim_coef.resize(static_cast<size_t>(o.j));
      for (int64_t j = 0; j < o.j; ++j) {
        dim_coef[j] = scale * free_bits_pass(aux[layout.kl_dim_mean() + j], Acc(o.free_bits));
      }
    }
    const KlCoefficients coef{nullptr, kl_coef.data(), free_bits ? dim_coef.data() : nullptr};
    kernels().gaussian_kl_backward(p.kl, coef, KlGrads{out.mu, out.logvar});
  }
}

}  // namespace

void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl, void* aux) {
  objective_forward_with_grad(p, loss, rec, kl, aux, nullptr);
}

bool objective_forward_with_grad(const ObjectiveProblem& p, void* loss, void* rec, void* kl,
                                 void* aux, void* grad_recon) {
  // With a shared scale, recon's gradient is not a per-sample multiple of one
  // tensor (the scale's own gradient sums over the batch).
  if (grad_recon != nullptr && uses_shared_scale(p.objective)) return false;
  if (p.recon.dtype == DType::kFloat64) {
    forward<double>(p, static_cast<double*>(loss), static_cast<double*>(rec),
                    static_cast<double*>(kl), static_cast<double*>(aux), grad_recon);
  } else {
    forward<float>(p, static_cast<float*>(loss), static_cast<float*>(rec), static_cast<float*>(kl),
                   static_cast<float*>(aux), grad_recon);
  }
  return true;
}

void gaussian_kl_sums(const KlProblem& p, void* kl, void* dim_mean) {
  if (p.dtype == DType::kFloat64) {
    kl_sums<double>(p, static_cast<double*>(kl), static_cast<double*>(dim_mean));
  } else {
    kl_sums<float>(p, static_cast<float*>(kl), static_cast<float*>(dim_mean));
  }
}

void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                        const ObjectiveGrads& out) {
  if (p.recon.dtype == DType::kFloat64) {
    backward<double>(p, grads, static_cast<const double*>(aux), out);
  } else {
    backward<float>(p, grads, static_cast<const float*>(aux), out);
  }
}

}  // namespace cpu
}  // namespace fusedvae
