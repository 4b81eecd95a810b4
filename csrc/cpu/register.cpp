// CPU kernels for the fusedvae ops: the build that kernels.cpp selected.
#include "../register_kernels.h"

namespace fusedvae {
class CpuBackend final : public Backend {
 public:
  void recon_forward(const ReconProblem& p, void* rec) const override {
    cpu::kernels().recon_loss_forward(p, rec);
  }
  void recon_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                      void* grad_log_scale) const override {
    cpu::kernels().recon_loss_backward(p, grad_rec, grad_recon, grad_log_scale);
  }
  void kl_forward(const KlProblem& p, bool per_dim, void* kl) const override {
    cpu::kernels().gaussian_kl_forward(p, per_dim, kl);
  }
  void kl_backward(const KlProblem& p, bool per_dim, const void* grad, void* grad_mu,
                   void* grad_logvar) const override {
    cpu::kernels().gaussian_kl_backward(p, per_dim, grad, grad_mu, grad_logvar);
  }
  void cb_forward(const CbProblem& p, void* out) const override {
    cpu::kernels().cb_log_normalizer_forward(p, out);
  }
  void cb_backward(const CbProblem& p, const void* grad, void* grad_logits) const override {
    cpu::kernels().cb_log_normalizer_backward(p, grad, grad_logits);
  }
};

}  // namespace fusedvae

TORCH_LIBRARY_IMPL(fusedvae, CPU, m) { fusedvae::register_kernels<fusedvae::CpuBackend>(m); }
