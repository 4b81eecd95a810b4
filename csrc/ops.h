// The torch-facing half of every op: argument checks, memory layout, output
// allocation. Device-specific work goes through a Backend, so the CPU and CUDA
// registrations share all of this and differ only in the kernels they call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "kernels.h"

namespace fusedvae {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual void recon_forward(const ReconProblem& p, void* rec) const = 0;
  virtual void recon_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                              void* grad_log_scale) const = 0;
  virtual void kl_forward(const KlProblem& p, bool per_dim, void* kl) const = 0;
  virtual void kl_backward(const KlProblem& p, bool per_dim, const void* grad, void* grad_mu,
                           void* grad_logvar) const = 0;
  virtual void cb_forward(const CbProblem& p, void* out) const = 0;
  virtual void cb_backward(const CbProblem& p, const void* grad, void* grad_logits) const = 0;
};

at::Tensor recon_loss(const Backend& backend, const at::Tensor& recon, const at::Tensor& target,
                      const std::optional<at::Tensor>& log_scale, c10::string_view likelihood,
                      bool logits);

std::tuple<at::Tensor, at::Tensor> recon_loss_backward(const Backend& backend,
                                                       const at::Tensor& grad,
                                                       const at::Tensor& recon,
                                                       const at::Tensor& target,
                                                       const std::optional<at::Tensor>& log_scale,
                                                       c10::string_view likelihood, bool logits);

at::Tensor gaussian_kl(const Backend& backend, const at::Tensor& mu, const at::Tensor& logvar,
                       bool per_dim);

std::tuple<at::Tensor, at::Tensor> gaussian_kl_backward(const Backend& backend,
                                                        const at::Tensor& grad,
                                                        const at::Tensor& mu,
                                                        const at::Tensor& logvar);

at::Tensor cb_log_normalizer(const Backend& backend, const at::Tensor& logits);

at::Tensor cb_log_normalizer_backward(const Backend& backend, const at::Tensor& grad,
                                      const at::Tensor& logits);

}  // namespace fusedvae
