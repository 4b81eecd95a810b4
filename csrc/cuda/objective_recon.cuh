// The objective's per-element stages for one recon type T: the forward's
// partial sums and the backward map (kernels.cuh declares them). Each
// objective_<type>.cu includes this and instantiates one T, so the heaviest
// template expansion (likelihood x target x scale x vector width) is spread
// over four files that compile in parallel.
#pragma once

#include "kernels.cuh"

namespace fusedvae {
namespace cuda {
namespace detail {

// f(O{}) for the ops policy of likelihood L's kernels over a recon of type T:
// math::FastExpOps for the logits likelihoods (one exp(-|x|) per element) with
// float accumulation under KernelOptions::cuda_fast_exp, else ScalarOps.
template <class L, typename T, typename F>
void with_recon_ops(const F& f) {
  using Acc = acc_t<T>;
  if constexpr (std::is_same_v<Acc, float> && L::kForm == math::ReconForm::kLogits) {
    if (kernel_options().cuda_fast_exp.load(std::memory_order_relaxed)) {
      f(math::FastExpOps{});
      return;
    }
  }
  f(math::ScalarOps<Acc>{});
}

template <typename T>
void objective_forward_recon(const ObjectiveProblem& p, Grid grid, void* workspace,
                             cudaStream_t stream) {
  const int64_t batch = p.objective.batch;
  dispatch_recon_as<T, __half, __nv_bfloat16>(p.recon, [&](auto l, auto, auto t_tag, auto s_tag) {
    using TargetT = typename decltype(t_tag)::type;
    using ScaleT = typename decltype(s_tag)::type;
    using Acc = acc_t<T>;
    using L = typename decltype(l)::type;
    const auto aligned_for = [&](auto width) {
      return aligned<decltype(width)::value>(batch, p.recon.numel_per_sample,
                                             {{p.recon.recon, int(sizeof(T))},
                                              {p.recon.target, int(sizeof(TargetT))},
                                              {p.recon.log_scale, int(sizeof(ScaleT))}});
    };
    const unsigned blocks = static_cast<unsigned>(batch * grid.chunks);
    Acc* partial = static_cast<Acc*>(workspace);
    with_recon_ops<L, T>([&](auto ops) {
      const ReconTerm<L, T, TargetT, ScaleT, decltype(ops)> term{
          static_cast<const T*>(p.recon.recon), static_cast<const TargetT*>(p.recon.target),
          static_cast<const ScaleT*>(p.recon.log_scale), p.recon.weight, p.recon.numel_per_sample};
      launch_widest<vec_width<T>(), wide_vec_width<T, TargetT>()>(aligned_for, [&](auto width) {
        sum_chunks_kernel<decltype(width)::value>
            <<<blocks, kThreads, 0, stream>>>(term, p.recon.numel_per_sample, grid, partial);
      });
    });
  });
}

template <typename T>
void objective_backward_recon(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                              const ObjectiveGrads& out, cudaStream_t stream) {
  const Objective& o = p.objective;
  const int device = current_device();
  const Grid recon_grid = make_grid(o.batch, o.n, device);
  const Grid kl_grid = make_grid(o.batch, o.j, device);
  // With recon_coef, block 0 of each sample's chunks writes c_b and the others return.
  const int64_t recon_blocks =
      (out.recon != nullptr || out.recon_coef != nullptr) && o.n > 0 ? o.batch * recon_grid.chunks
                                                                      : 0;
  const int64_t kl_blocks = out.mu != nullptr && o.j > 0 ? o.batch * kl_grid.chunks : 0;
  const int64_t blocks = recon_blocks + kl_blocks > 0 ? recon_blocks + kl_blocks : 1;
  dispatch_recon_as<T, __half, __nv_bfloat16>(p.recon, [&](auto l, auto, auto t_tag, auto s_tag) {
    using TargetT = typename decltype(t_tag)::type;
    using ScaleT = typename decltype(s_tag)::type;
    using L = typename decltype(l)::type;
    const auto aligned_for = [&](auto width) {
      return aligned<decltype(width)::value>(
          o.batch, o.n,
          {{p.recon.recon, int(sizeof(T))},
           {p.recon.target, int(sizeof(TargetT))},
           {p.recon.log_scale, int(sizeof(ScaleT))},
           {out.recon, int(sizeof(T))},
           {objective::uses_shared_scale(o) ? nullptr : out.log_scale, int(sizeof(ScaleT))}});
    };
    const auto* aux_acc = static_cast<const acc_t<T>*>(aux);
    with_recon_ops<L, T>([&](auto ops) {
      launch_widest<vec_width<T>(), wide_vec_width<T, TargetT>()>(aligned_for, [&](auto width) {
        objective_backward_kernel<decltype(width)::value, L, T, TargetT, ScaleT, decltype(ops)>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                p, grads, aux_acc, out, recon_grid, recon_blocks, kl_grid);
      });
    });
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace fusedvae

// FUSEDVAE_INSTANTIATE_OBJECTIVE(T): the one line of each objective_<type>.cu.
#define FUSEDVAE_INSTANTIATE_OBJECTIVE(T)                                                       \
  namespace fusedvae {                                                                          \
  namespace cuda {                                                                              \
  namespace detail {                                                                            \
  template void objective_forward_recon<T>(const ObjectiveProblem&, Grid, void*, cudaStream_t); \
  template void objective_backward_recon<T>(const ObjectiveProblem&, const OutputGrads&,        \
                                            const void*, const ObjectiveGrads&, cudaStream_t);  \
  }                                                                                             \
  }                                                                                             \
  }
