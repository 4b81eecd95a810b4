// The CPU entry points of kernels.h: each forwards to the AVX-512 build of the
// kernels where torch itself runs AVX-512 code (at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY), else to the AVX2 build.
#include "../kernels.h"

#include <ATen/Version.h>

namespace fusedvae {
namespace cpu {

#define FUSEDVAE_DECLARE_CPU_KERNELS(ISA)                                                      \
  namespace ISA {                                                                              \
  void recon_loss_forward(const ReconProblem& p, void* rec);                                   \
  void recon_loss_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,      \
                           void* grad_log_scale);                                              \
  void gaussian_kl_forward(const KlProblem& p, bool per_dim, void* kl);                        \
  void gaussian_kl_backward(const KlProblem& p, bool per_dim, const void* grad, void* grad_mu, \
                            void* grad_logvar);                                                \
  void cb_log_normalizer_forward(const CbProblem& p, void* out);                               \
  void cb_log_normalizer_backward(const CbProblem& p, const void* grad, void* grad_logits);    \
  }

FUSEDVAE_DECLARE_CPU_KERNELS(CPU_CAPABILITY)
#if defined(__x86_64__) || defined(_M_X64)
FUSEDVAE_DECLARE_CPU_KERNELS(AVX512)
#define FUSEDVAE_PICK(fn) (use_avx512() ? &AVX512::fn : &CPU_CAPABILITY::fn)
namespace {
bool use_avx512() {
  static const bool yes = at::get_cpu_capability().rfind("AVX512", 0) == 0;
  return yes;
}
}  // namespace
#else
#define FUSEDVAE_PICK(fn) (&CPU_CAPABILITY::fn)
#endif

void recon_loss_forward(const ReconProblem& p, void* rec) {
  FUSEDVAE_PICK(recon_loss_forward)(p, rec);
}

void recon_loss_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                         void* grad_log_scale) {
  FUSEDVAE_PICK(recon_loss_backward)(p, grad_rec, grad_recon, grad_log_scale);
}

void gaussian_kl_forward(const KlProblem& p, bool per_dim, void* kl) {
  FUSEDVAE_PICK(gaussian_kl_forward)(p, per_dim, kl);
}

void gaussian_kl_backward(const KlProblem& p, bool per_dim, const void* grad, void* grad_mu,
                          void* grad_logvar) {
  FUSEDVAE_PICK(gaussian_kl_backward)(p, per_dim, grad, grad_mu, grad_logvar);
}

void cb_log_normalizer_forward(const CbProblem& p, void* out) {
  FUSEDVAE_PICK(cb_log_normalizer_forward)(p, out);
}

void cb_log_normalizer_backward(const CbProblem& p, const void* grad, void* grad_logits) {
  FUSEDVAE_PICK(cb_log_normalizer_backward)(p, grad, grad_logits);
}

}  // namespace cpu
}  // namespace fusedvae
