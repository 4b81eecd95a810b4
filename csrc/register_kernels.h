// Registers the shared op implementations (ops.h) for one dispatch key, bound
// to that key's Backend (a stateless class, built where it is used). Used by cpu/register.cpp and
// cuda/register.cpp.
#pragma once

#include <torch/library.h>

#include "ops.h"

namespace fusedvae {

template <class BackendT>
void register_kernels(torch::Library& m) {
  using at::Tensor;
  using OptTensor = std::optional<Tensor>;
  m.impl("vae_loss", [](const Tensor& recon, const Tensor& target, const Tensor& mu,
                        const Tensor& logvar, const OptTensor& log_scale, const OptTensor& beta,
                        c10::string_view likelihood, bool logits, c10::string_view reduction,
                        double log_scale_value, bool optimal_scale, double beta_value,
                        double free_bits, const OptTensor& weight) {
    return vae_loss(BackendT{}, recon, target, mu, logvar, log_scale, beta, likelihood, logits,
                    reduction, log_scale_value, optimal_scale, beta_value, free_bits, weight);
  });
  m.impl("vae_loss_backward",
         [](const OptTensor& grad_loss, const OptTensor& grad_rec, const OptTensor& grad_kl,
            const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
            const OptTensor& log_scale, const OptTensor& beta, const Tensor& aux,
            c10::string_view likelihood, bool logits, c10::string_view reduction,
            double log_scale_value, bool optimal_scale, double beta_value, double free_bits,
            std::array<bool, 4> output_mask, const OptTensor& weight, bool recon_coefficients) {
           return vae_loss_backward(BackendT{}, grad_loss, grad_rec, grad_kl, recon, target, mu,
                                    logvar, log_scale, beta, aux, likelihood, logits, reduction,
                                    log_scale_value, optimal_scale, beta_value, free_bits,
                                    output_mask, weight, recon_coefficients);
         });
  m.impl("vae_loss_and_grad",
         [](const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
            const OptTensor& log_scale, const OptTensor& beta, c10::string_view likelihood,
            bool logits, c10::string_view reduction, double log_scale_value, bool optimal_scale,
            double beta_value, double free_bits, const OptTensor& weight) {
           return vae_loss_and_grad(BackendT{}, recon, target, mu, logvar, log_scale, beta,
                                    likelihood, logits, reduction, log_scale_value, optimal_scale,
                                    beta_value, free_bits, weight);
         });
  m.impl("gaussian_kl_per_dim", [](const Tensor& mu, const Tensor& logvar) {
    return gaussian_kl_per_dim(BackendT{}, mu, logvar);
  });
  m.impl("gaussian_kl_per_dim_backward",
         [](const Tensor& grad, const Tensor& mu, const Tensor& logvar) {
           return gaussian_kl_per_dim_backward(BackendT{}, grad, mu, logvar);
         });
  m.impl("gaussian_kl", [](at::TensorList mu, at::TensorList logvar, at::TensorList prior_mu,
                           at::TensorList prior_logvar, at::ArrayRef<double> free_bits) {
    return gaussian_kl(BackendT{}, mu, logvar, prior_mu, prior_logvar, free_bits);
  });
  m.impl("gaussian_kl_backward",
         [](const OptTensor& grad_kl, const OptTensor& grad_kl_term, at::TensorList mu,
            at::TensorList logvar, at::TensorList prior_mu, at::TensorList prior_logvar,
            const Tensor& dim_mean, at::ArrayRef<double> free_bits) {
           return gaussian_kl_backward(BackendT{}, grad_kl, grad_kl_term, mu, logvar, prior_mu,
                                       prior_logvar, dim_mean, free_bits);
         });
  m.impl("cb_log_normalizer",
         [](const Tensor& logits) { return cb_log_normalizer(BackendT{}, logits); });
  m.impl("cb_log_normalizer_backward", [](const Tensor& grad, const Tensor& logits) {
    return cb_log_normalizer_backward(BackendT{}, grad, logits);
  });
  m.impl("dmol_nll",
         [](const Tensor& params, const Tensor& target, int64_t bits, double log_scale_min) {
           return dmol_nll(BackendT{}, params, target, bits, log_scale_min);
         });
  m.impl("dmol_nll_and_grad",
         [](const Tensor& params, const Tensor& target, int64_t bits, double log_scale_min) {
           return dmol_nll_and_grad(BackendT{}, params, target, bits, log_scale_min);
         });
  m.impl("dmol_nll_and_pixel_nll",
         [](const Tensor& params, const Tensor& target, int64_t bits, double log_scale_min) {
           return dmol_nll_and_pixel_nll(BackendT{}, params, target, bits, log_scale_min);
         });
  m.impl("dmol_nll_backward", [](const Tensor& grad, const Tensor& params, const Tensor& target,
                                 int64_t bits, double log_scale_min, const OptTensor& pixel_nll) {
    return dmol_nll_backward(BackendT{}, grad, params, target, bits, log_scale_min, pixel_nll);
  });
}

}  // namespace fusedvae
