// CPU kernels for the fusedvae ops: the build that kernels.cpp selected.
#include "../register_kernels.h"

namespace fusedvae {
class CpuBackend final : public Backend {
 public:
  void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl,
                         void* aux) const override {
    cpu::objective_forward(p, loss, rec, kl, aux);
  }
  bool objective_forward_with_grad(const ObjectiveProblem& p, void* loss, void* rec, void* kl,
                                   void* aux, void* grad_recon) const override {
    return cpu::objective_forward_with_grad(p, loss, rec, kl, aux, grad_recon);
  }
  void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                          const ObjectiveGrads& out) const override {
    cpu::objective_backward(p, grads, aux, out);
  }
  void kl_per_dim(const KlProblem& p, void* kl) const override {
    cpu::kernels().gaussian_kl_forward(p, /*per_dim=*/true, kl);
  }
  void kl_sums(const KlProblem& p, void* kl, void* dim_mean) const override {
    cpu::gaussian_kl_sums(p, kl, dim_mean);
  }
  void kl_backward(const KlProblem& p, const KlCoefficients& coef,
                   const KlGrads& grads) const override {
    cpu::kernels().gaussian_kl_backward(p, coef, grads);
  }
  void cb_forward(const CbProblem& p, void* out) const override {
    cpu::kernels().cb_log_normalizer_forward(p, out);
  }
  void cb_backward(const CbProblem& p, const void* grad, void* grad_logits) const override {
    cpu::kernels().cb_log_normalizer_backward(p, grad, grad_logits);
  }
  void dmol_forward(const DmolProblem& p, void* nll, void* pixel_nll) const override {
    cpu::kernels().dmol_forward(p, nll, pixel_nll);
  }
  void dmol_backward(const DmolProblem& p, const void* grad, const void* pixel_nll,
                     void* grad_params, const int64_t* grad_strides) const override {
    cpu::kernels().dmol_backward(p, grad, pixel_nll, grad_params, grad_strides);
  }
  void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                              const int64_t* grad_strides) const override {
    cpu::kernels().dmol_forward_with_grad(p, nll, grad_params, grad_strides);
  }
};

}  // namespace fusedvae

TORCH_LIBRARY_IMPL(fusedvae, CPU, m) { fusedvae::register_kernels<fusedvae::CpuBackend>(m); }
