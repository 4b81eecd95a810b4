// CUDA kernels for the fusedvae ops: torch's current stream, a workspace from
// its caching allocator for the reductions' partial sums, nothing synchronous.
// ops.cpp has already made the inputs' device current.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "../register_kernels.h"

namespace fusedvae {

namespace {

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor workspace(int64_t bytes) {
  return at::empty(
      {bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace

class CudaBackend final : public Backend {
 public:
  void recon_forward(const ReconProblem& p, void* rec) const override {
    at::Tensor scratch =
        workspace(cuda::recon_loss_workspace_bytes(p, c10::cuda::current_device()));
    cuda::recon_loss_forward(p, rec, scratch.data_ptr(), stream());
    check_launch();
  }
  void recon_backward(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                      void* grad_log_scale) const override {
    cuda::recon_loss_backward(p, grad_rec, grad_recon, grad_log_scale, stream());
    check_launch();
  }
  void kl_forward(const KlProblem& p, bool per_dim, void* kl) const override {
    at::Tensor scratch =
        workspace(per_dim ? 0 : cuda::gaussian_kl_workspace_bytes(p, c10::cuda::current_device()));
    cuda::gaussian_kl_forward(p, per_dim, kl, scratch.data_ptr(), stream());
    check_launch();
  }
  void kl_backward(const KlProblem& p, bool per_dim, const void* grad, void* grad_mu,
                   void* grad_logvar) const override {
    cuda::gaussian_kl_backward(p, per_dim, grad, grad_mu, grad_logvar, stream());
    check_launch();
  }
  void cb_forward(const CbProblem& p, void* out) const override {
    cuda::cb_log_normalizer_forward(p, out, stream());
    check_launch();
  }
  void cb_backward(const CbProblem& p, const void* grad, void* grad_logits) const override {
    cuda::cb_log_normalizer_backward(p, grad, grad_logits, stream());
    check_launch();
  }
};

}  // namespace fusedvae

TORCH_LIBRARY_IMPL(fusedvae, CUDA, m) { fusedvae::register_kernels<fusedvae::CudaBackend>(m); }
