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
  m.impl("recon_loss", [](const Tensor& recon, const Tensor& target, const OptTensor& log_scale,
                          c10::string_view likelihood, bool logits) {
    return recon_loss(BackendT{}, recon, target, log_scale, likelihood, logits);
  });
  m.impl("recon_loss_backward", [](const Tensor& grad, const Tensor& recon, const Tensor& target,
                                   const OptTensor& log_scale, c10::string_view likelihood,
                                   bool logits) {
    return recon_loss_backward(BackendT{}, grad, recon, target, log_scale, likelihood, logits);
  });
  m.impl("gaussian_kl", [](const Tensor& mu, const Tensor& logvar) {
    return gaussian_kl(BackendT{}, mu, logvar, /*per_dim=*/false);
  });
  m.impl("gaussian_kl_per_dim", [](const Tensor& mu, const Tensor& logvar) {
    return gaussian_kl(BackendT{}, mu, logvar, /*per_dim=*/true);
  });
  m.impl("gaussian_kl_backward", [](const Tensor& grad, const Tensor& mu, const Tensor& logvar) {
    return gaussian_kl_backward(BackendT{}, grad, mu, logvar);
  });
  m.impl("cb_log_normalizer",
         [](const Tensor& logits) { return cb_log_normalizer(BackendT{}, logits); });
  m.impl("cb_log_normalizer_backward", [](const Tensor& grad, const Tensor& logits) {
    return cb_log_normalizer_backward(BackendT{}, grad, logits);
  });
}

}  // namespace fusedvae
