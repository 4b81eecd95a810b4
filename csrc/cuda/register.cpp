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
  void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl,
                         void* aux) const override {
    at::Tensor scratch = workspace(cuda::objective_workspace_bytes(p, c10::cuda::current_device()));
    cuda::objective_forward(p, loss, rec, kl, aux, scratch.data_ptr(), stream());
    check_launch();
  }
  void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                          const ObjectiveGrads& out) const override {
    cuda::objective_backward(p, grads, aux, out, stream());
    check_launch();
  }
  void kl_per_dim(const KlProblem& p, void* kl) const override {
    cuda::gaussian_kl_per_dim(p, kl, stream());
    check_launch();
  }
  void kl_sums(const KlProblem& p, void* kl, void* dim_mean) const override {
    cuda::gaussian_kl_sums(p, kl, dim_mean, stream());
    check_launch();
  }
  void kl_backward(const KlProblem& p, const KlCoefficients& coef,
                   const KlGrads& grads) const override {
    cuda::gaussian_kl_backward(p, coef, grads, stream());
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
  void dmol_forward(const DmolProblem& p, void* nll, void* pixel_nll) const override {
    at::Tensor scratch = workspace(cuda::dmol_workspace_bytes(p));
    cuda::dmol_forward(p, nll, pixel_nll, scratch.data_ptr(), stream());
    check_launch();
  }
  void dmol_backward(const DmolProblem& p, const void* grad, const void* pixel_nll,
                     void* grad_params, const int64_t* grad_strides) const override {
    cuda::dmol_backward(p, grad, pixel_nll, grad_params, grad_strides, stream());
    check_launch();
  }
  void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                              const int64_t* grad_strides) const override {
    at::Tensor scratch = workspace(cuda::dmol_workspace_bytes(p));
    cuda::dmol_forward_with_grad(p, nll, grad_params, grad_strides, scratch.data_ptr(), stream());
    check_launch();
  }
};

}  // namespace fusedvae

TORCH_LIBRARY_IMPL(fusedvae, CUDA, m) { fusedvae::register_kernels<fusedvae::CudaBackend>(m); }
