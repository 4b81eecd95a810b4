// The torch-facing half of every op: argument checks, memory layout, output
// allocation. Device-specific work goes through a Backend, so the CPU and CUDA
// registrations share all of this and differ only in the kernels they call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace fusedvae {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl,
                                 void* aux) const = 0;
  virtual void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads,
                                  const void* aux, const ObjectiveGrads& out) const = 0;
  // cpu::objective_forward_with_grad's contract, where the backend has the
  // one-pass kernels; false: vae_loss_and_grad runs objective_forward, then
  // objective_backward for grad_loss = 1.
  virtual bool objective_forward_with_grad(const ObjectiveProblem&, void*, void*, void*, void*,
                                           void*) const {
    return false;
  }
  virtual void kl_per_dim(const KlProblem& p, void* kl) const = 0;
  // cpu::gaussian_kl_sums' contract.
  virtual void kl_sums(const KlProblem& p, void* kl, void* dim_mean) const = 0;
  virtual void kl_backward(const KlProblem& p, const KlCoefficients& coef,
                           const KlGrads& grads) const = 0;
  virtual void cb_forward(const CbProblem& p, void* out) const = 0;
  virtual void cb_backward(const CbProblem& p, const void* grad, void* grad_logits) const = 0;
  // cpu::Kernels::dmol_forward's and dmol_backward's contracts.
  virtual void dmol_forward(const DmolProblem& p, void* nll, void* pixel_nll) const = 0;
  virtual void dmol_backward(const DmolProblem& p, const void* grad, const void* pixel_nll,
                             void* grad_params, const int64_t* grad_strides) const = 0;
  // dmol_forward's nll and dmol_backward's gradient for grad = 1, in one pass.
  virtual void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                                      const int64_t* grad_strides) const = 0;
};

// The schemas are in registration.cpp (FUSEDVAE_OP_SCHEMAS).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss(
    const Backend& backend, const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
    const std::optional<at::Tensor>& beta, c10::string_view likelihood, bool logits,
    c10::string_view reduction, double log_scale_value, bool optimal_scale, double beta_value,
    double free_bits, const std::optional<at::Tensor>& weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_backward(
    const Backend& backend, const std::optional<at::Tensor>& grad_loss,
    const std::optional<at::Tensor>& grad_rec, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
    const std::optional<at::Tensor>& beta, const at::Tensor& aux, c10::string_view likelihood,
    bool logits, c10::string_view reduction, double log_scale_value, bool optimal_scale,
    double beta_value, double free_bits, std::array<bool, 4> output_mask,
    const std::optional<at::Tensor>& weight, bool recon_coefficients);

// Whether recon's gradient is a per-sample multiple of rec.sum()'s, so of
// vae_loss_and_grad's (vae_loss_backward's recon_coefficients): where no
// log-scale is shared by the batch.
bool recon_gradient_is_per_sample(c10::string_view likelihood, bool logits,
                                  const std::optional<at::Tensor>& log_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_and_grad(
    const Backend& backend, const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
    const std::optional<at::Tensor>& beta, c10::string_view likelihood, bool logits,
    c10::string_view reduction, double log_scale_value, bool optimal_scale, double beta_value,
    double free_bits, const std::optional<at::Tensor>& weight);

at::Tensor gaussian_kl_per_dim(const Backend& backend, const at::Tensor& mu,
                               const at::Tensor& logvar);

std::tuple<at::Tensor, at::Tensor> gaussian_kl_per_dim_backward(const Backend& backend,
                                                                const at::Tensor& grad,
                                                                const at::Tensor& mu,
                                                                const at::Tensor& logvar);

// The KL of diagonal-Gaussian posteriors to their priors over latent groups
// (registration.cpp's schema); the prior lists are empty (N(0, I)) or one per group.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_kl(const Backend& backend,
                                                           at::TensorList mu, at::TensorList logvar,
                                                           at::TensorList prior_mu,
                                                           at::TensorList prior_logvar,
                                                           at::ArrayRef<double> free_bits);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
gaussian_kl_backward(const Backend& backend, const std::optional<at::Tensor>& grad_kl,
                     const std::optional<at::Tensor>& grad_kl_term, at::TensorList mu,
                     at::TensorList logvar, at::TensorList prior_mu, at::TensorList prior_logvar,
                     const at::Tensor& dim_mean, at::ArrayRef<double> free_bits);

at::Tensor cb_log_normalizer(const Backend& backend, const at::Tensor& logits);

at::Tensor cb_log_normalizer_backward(const Backend& backend, const at::Tensor& grad,
                                      const at::Tensor& logits);

at::Tensor dmol_nll(const Backend& backend, const at::Tensor& params, const at::Tensor& target,
                    int64_t bits, double log_scale_min);

std::tuple<at::Tensor, at::Tensor> dmol_nll_and_grad(const Backend& backend,
                                                     const at::Tensor& params,
                                                     const at::Tensor& target, int64_t bits,
                                                     double log_scale_min);
std::tuple<at::Tensor, at::Tensor> dmol_nll_and_pixel_nll(const Backend& backend,
                                                          const at::Tensor& params,
                                                          const at::Tensor& target, int64_t bits,
                                                          double log_scale_min);
at::Tensor dmol_nll_backward(const Backend& backend, const at::Tensor& grad,
                             const at::Tensor& params, const at::Tensor& target, int64_t bits,
                             double log_scale_min, const std::optional<at::Tensor>& pixel_nll);

}  // namespace fusedvae
