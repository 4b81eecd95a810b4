// CUDA kernels: the per-element math of vae_math.h over raw pointers. No torch
// headers; cuda/register.cpp supplies the stream, the device and the workspace.
// The shared parts and the work decomposition are in kernels.cuh; the
// objective's per-element stages are compiled per recon type in
// objective_<type>.cu.
#include "kernels.cuh"

namespace fusedvae {
namespace cuda {

using namespace detail;

int64_t objective_workspace_bytes(const ObjectiveProblem& p, int device) {
  const Grid grid = make_grid(p.recon.batch, p.recon.numel_per_sample, device);
  return p.recon.batch * grid.chunks * acc_size(p.recon.dtype);
}

void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl, void* aux,
                       void* workspace, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t batch = p.objective.batch;
  const Grid grid = make_grid(batch, p.recon.numel_per_sample, current_device());
  if (batch > 0) {
    dispatch_dtype<__half, __nv_bfloat16>(p.recon.dtype, [&](auto tag) {
      objective_forward_recon<typename decltype(tag)::type>(p, grid, workspace, stream);
    });
  }
  dispatch_acc(p.recon.dtype, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    const AuxLayout layout{batch, p.objective.j};
    Acc* aux_acc = as_acc<Acc>(aux);
    const bool free_bits = p.objective.free_bits > 0;
    const int64_t kl_blocks = batch + (free_bits ? (p.objective.j + kThreads - 1) / kThreads : 0);
    if (kl_blocks > 0) {
      kl_forward_kernel<Acc><<<static_cast<unsigned>(kl_blocks), kThreads, 0, stream>>>(
          p.kl, free_bits, as_acc<Acc>(kl), aux_acc + layout.kl(), aux_acc + layout.kl_dim_mean());
    }
    finalize_kernel<Acc><<<1, kThreads, 0, stream>>>(p, static_cast<const Acc*>(workspace),
                                                     grid.chunks, as_acc<Acc>(loss),
                                                     as_acc<Acc>(rec), as_acc<Acc>(kl), aux_acc);
  });
}

void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                        const ObjectiveGrads& out, void* stream_ptr) {
  dispatch_dtype<__half, __nv_bfloat16>(p.recon.dtype, [&](auto tag) {
    objective_backward_recon<typename decltype(tag)::type>(p, grads, aux, out,
                                                           static_cast<cudaStream_t>(stream_ptr));
  });
}

void gaussian_kl_per_dim(const KlProblem& p, void* kl, void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int VEC = vec_width<T>();
    const T* mu = static_cast<const T*>(p.mu);
    const T* lv = static_cast<const T*>(p.logvar);
    const bool vectorize =
        aligned<VEC>(p.batch, p.latent_dim,
                     {{mu, int(sizeof(T))}, {lv, int(sizeof(T))}, {kl, int(sizeof(Acc))}});
    launch_map<VEC>(KlPerDim<T>{mu, lv, static_cast<Acc*>(kl)}, vectorize, p.batch, p.latent_dim,
                    static_cast<cudaStream_t>(stream));
  });
}

void gaussian_kl_backward(const KlProblem& p, const KlCoefficients& coef, const KlGrads& grads,
                          void* stream) {
  const int64_t numel = p.batch * p.latent_dim;
  if (numel == 0) return;
  dispatch_acc(p.dtype, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    kl_backward_kernel<Acc>
        <<<elementwise_blocks(numel), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, coef,
                                                                                        grads);
  });
}

void gaussian_kl_sums(const KlProblem& p, void* kl, void* dim_mean, void* stream) {
  const bool free_bits = dim_mean != nullptr;
  const int64_t blocks = p.batch + (free_bits ? (p.latent_dim + kThreads - 1) / kThreads : 0);
  if (blocks == 0) return;
  dispatch_acc(p.dtype, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    kl_forward_kernel<Acc>
        <<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
            p, free_bits, as_acc<Acc>(kl), as_acc<Acc>(kl), as_acc<Acc>(dim_mean));
  });
}

void cb_log_normalizer_forward(const CbProblem& p, void* out, void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = vec_width<T>();
    const bool vectorize =
        aligned<VEC>(1, p.numel, {{p.logits, int(sizeof(T))}, {out, int(sizeof(T))}});
    launch_map<VEC>(CbValue<T>{static_cast<const T*>(p.logits), static_cast<T*>(out)}, vectorize, 1,
                    p.numel, static_cast<cudaStream_t>(stream));
  });
}

void cb_log_normalizer_backward(const CbProblem& p, const void* grad, void* grad_logits,
                                void* stream) {
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = vec_width<T>();
    const bool vectorize = aligned<VEC>(
        1, p.numel,
        {{p.logits, int(sizeof(T))}, {grad, int(sizeof(T))}, {grad_logits, int(sizeof(T))}});
    launch_map<VEC>(CbGrad<T>{static_cast<const T*>(p.logits), static_cast<const T*>(grad),
                              static_cast<T*>(grad_logits)},
                    vectorize, 1, p.numel, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace fusedvae
