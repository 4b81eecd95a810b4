// The kernel interface: raw pointers and sizes, no torch headers, so that the
// CUDA translation units compile with nvcc alone. The torch-facing code in
// ops.cpp checks the tensors, picks the memory layout, allocates the outputs
// and calls one of the two backends declared here.
//
// Layout contract: every "big" tensor (recon, target, log_scale, gradients)
// holds each sample as one dense block of `numel_per_sample` elements, sample b
// starting at element b * numel_per_sample, and all big tensors of one call
// share the same element order inside a sample. Per-sample results and
// upstream gradients are dense [batch] vectors in the accumulation type:
// float for float16/bfloat16/float32 inputs, double for float64.
#pragma once

#include <atomic>
#include <cstdint>

#include "objective.h"
#include "vae_math.h"

namespace fusedvae {

enum class DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kUInt8 = 4,  // pixels, read as value / 255
  kBool = 5,   // read as 0 or 1
};

// A per-element weight broadcast over recon (the `weight` of vae_loss), read
// where it lies, never expanded: element k of sample b (k in recon's memory
// order within the sample) has weight data[b·batch_stride + Σ_d c_d·strides[d]]
// with (c_0, ..., c_{dims-1}) the digits of k in the mixed radix `sizes`
// (outermost first). Adjacent dimensions are merged where the strides allow,
// so a weight of recon's layout has one dimension of stride 1 and a
// per-sample one a single dimension of stride 0.
constexpr int kMaxWeightDims = 8;
struct WeightView {
  const void* data;  // in the accumulation type; null: every weight is 1
  int64_t batch_stride;
  int dims;
  int64_t sizes[kMaxWeightDims];
  int64_t strides[kMaxWeightDims];
};

// A reconstruction problem: recon x, target t and, for a scaled likelihood
// with a log-scale per element, s shaped like x (otherwise null). Each is read in
// its own dtype and converted on load, so no promoted copy is ever made; the
// combinations the kernels take (dispatch.h's dispatch_recon) are:
//   x float64: t float64, uint8 or bool; s float64;
//   x float32, float16 or bfloat16: t float32, float16, bfloat16, uint8 or
//   bool; s of x's dtype or float32.
struct ReconProblem {
  const void* recon;
  const void* target;
  const void* log_scale;
  DType dtype;         // of recon, and of its gradient
  DType target_dtype;  //
  DType scale_dtype;   // of log_scale and its gradient, where there is one
  int64_t batch;
  int64_t numel_per_sample;
  int likelihood;     // the index of its traits type in math::Likelihoods
  bool shared_scale;  // a scaled likelihood with one log-scale for the batch: the
                      // kernels sum its residual (math::ResidualOf) instead of ℓ
  WeightView weight;  // each element's ℓ (or residual) and its derivatives times w
};

// A diagonal-Gaussian posterior: mu and logvar, both dense [batch, latent],
// and the prior it is compared with: N(prior_mu, exp(prior_logvar)), dense and
// of the posterior's shape and dtype, or N(0, I) where both are null.
struct KlProblem {
  const void* mu;
  const void* logvar;
  DType dtype;
  int64_t batch;
  int64_t latent_dim;
  const void* prior_mu = nullptr;
  const void* prior_logvar = nullptr;
  FUSEDVAE_HD bool has_prior() const { return prior_mu != nullptr; }
};

// The gradients of a KL's inputs (of the KlProblem's dtype and layout); the
// prior's are written only where the problem has a prior.
struct KlGrads {
  void* mu;
  void* logvar;
  void* prior_mu = nullptr;
  void* prior_logvar = nullptr;
};

// The coefficient each KL element's derivatives (∂/∂μ, ∂/∂lv) are multiplied
// by, in the accumulation type: per_element[b, j] where given, else
// per_sample[b] + per_dim[j], either term 0 where null.
struct KlCoefficients {
  const void* per_element;
  const void* per_sample;
  const void* per_dim;
};

// The whole objective: the reconstruction (its residual for a scaled
// likelihood with one scale, which objective.scale says how to find), the KL of
// the posterior, and the scalars of objective.h. recon's and kl's dtypes have
// the same accumulation type.
struct ObjectiveProblem {
  ReconProblem recon;
  KlProblem kl;
  Objective objective;
  const void* log_scale_scalar;  // ScaleKind::kTensor: one value of the accumulation type
  const void* beta;  // one value of the accumulation type, or null: objective.beta_value
  // With a weight and a shared scale: W_b = Σ_i w_bi per sample (accumulation
  // type, at stride weight_sums_stride), which stands for N in the closed form;
  // null: N.
  const void* weight_sums;
  int64_t weight_sums_stride;
};

// The outputs of the objective's backward, each null where not wanted:
// gradients of recon (recon's dtype and layout), mu and logvar (theirs),
// log_scale (per element: of the scale's dtype, shaped like recon; shared:
// one value of the accumulation type) and beta (one value, accumulation type).
// recon_coef, where not null (the scale not shared), receives instead of
// recon's gradient the factors c_b / c1 ([batch], accumulation type), c_b
// the coefficient of sample b's ∂rec_b/∂recon in it and c1 that of
// loss.backward() (objective::unit_rec_coefficient): recon's gradient is
// vae_loss_and_grad's times them.
struct ObjectiveGrads {
  void* recon;
  void* mu;
  void* logvar;
  void* log_scale;
  void* beta;
  void* recon_coef;
};

// Elementwise continuous-Bernoulli log-normaliser over `numel` dense values.
struct CbProblem {
  const void* logits;
  DType dtype;
  int64_t numel;
};

// Parameters per mixture component of the discretized mixture: its logit, and
// per colour channel a mean and a log-scale, with three coupling coefficients
// for RGB: 10 for C = 3, 3 for C = 1.
constexpr int64_t dmol_params_per_component(int64_t channels) { return channels == 3 ? 10 : 3; }

// The discretized mixture of logistics (dmol.h) over a batch of images:
// params [batch, (1 + 3C)·K or 3K, H, W] and target [batch, C, H, W], each read
// through its strides (elements) of batch, channel and pixel, the pixel index
// running over H·W (a dense NCHW or channels-last tensor has one). target:
// uint8 pixels, read as v / 127.5 - 1, or float32/float64 values in [-1, 1].
struct DmolProblem {
  const void* params;
  DType dtype;  // of params, and of its gradient
  const void* target;
  DType target_dtype;  // kUInt8, kFloat32 or kFloat64
  int64_t batch;
  int channels;  // 1 or 3
  int64_t k;
  int64_t pixels;  // H·W
  int64_t param_strides[3];
  int64_t target_strides[3];
  double half_width;  // 1 / (2^bits - 1)
  double log_scale_min;
};

namespace cpu {
// The float32 approximations the CPU kernels evaluate instead of library calls,
// exposed elementwise for their accuracy tests (fusedvae._C._cpu_float_math).
enum class FloatMath : int {
  kExpNonpositive = 0,    // e^x, x <= 0 (cpu/vec_ops.h)
  kLog1pUnit = 1,         // log(1 + e), e in [0, 1] (math::log1p_unit)
  kExpApprox = 2,         // e^x (cpu/vec_ops.h, like the three below)
  kExpm1Nonpositive = 3,  // e^x - 1, x <= 0
  kLogApprox = 4,         // log(x)
  kTanhApprox = 5,        // tanh(x)
  kExpm1Approx = 6,       // e^x - 1
  kSigmoid = 7,           // 1 / (1 + e^-x) (math::sigmoid_from, the logits' gradient)
  kLogProduct3 = 8,       // log(x·x·x) as log_product3(x, x, x) (cpu/vec_ops.h)
};

// The CPU kernels of one instruction set. Each set is compiled from
// cpu/kernels_impl.h in a translation unit of its own with that set's compiler
// flags: the baseline build inside fusedvae._C, AVX2 and AVX-512 builds in
// modules of their own that are loaded only on a CPU that runs them
// (cpu/kernels.cpp).
struct Kernels {
  const char* isa;  // as torch names it (at::get_cpu_capability()): "DEFAULT", "AVX2", "AVX512"
  // rec[b] = Σ_i ℓ(x_bi, t_bi).
  void (*recon_loss_forward)(const ReconProblem& p, void* rec);
  // grad_recon = grad_rec[b] · (w · ∂ℓ/∂x) (dtype of recon); grad_log_scale
  // likewise for the Gaussian where grad_log_scale is not null (ignored otherwise).
  void (*recon_loss_backward)(const ReconProblem& p, const void* grad_rec, void* grad_recon,
                              void* grad_log_scale);
  // recon_loss_forward's rec and, in the same pass, recon_loss_backward's
  // grad_recon for grad_rec[b] = scale (one value of the accumulation type,
  // passed exactly as a double) for every sample: the same bits.
  void (*recon_loss_forward_with_grad)(const ReconProblem& p, void* rec, void* grad_recon,
                                       double scale);
  // per_dim == false: kl[b] = Σ_j kl_bj (accumulation type, [batch]);
  // per_dim == true:  kl[b, j] (accumulation type, [batch, latent]).
  void (*gaussian_kl_forward)(const KlProblem& p, bool per_dim, void* kl);
  // Each gradient in `grads` = c_bj·∂kl_bj/∂(its input) (of `dtype`), c from `coef`.
  void (*gaussian_kl_backward)(const KlProblem& p, const KlCoefficients& coef,
                               const KlGrads& grads);
  // out (of `dtype`) = log C(logits); grad_logits = grad · d log C / dη.
  void (*cb_log_normalizer_forward)(const CbProblem& p, void* out);
  void (*cb_log_normalizer_backward)(const CbProblem& p, const void* grad, void* grad_logits);
  // nll[b] = Σ over sample b's pixels of -log p(pixel) (accumulation type,
  // [batch]), and where pixel_nll is not null pixel_nll[b · pixels + i] =
  // -log p(pixel i); grad_params (params' dtype, through grad_strides: batch,
  // channel, pixel) = grad[b] · ∂nll_b/∂params. The backward may take the
  // forward's pixel_nll (or null) in place of a first pass that forms it.
  void (*dmol_forward)(const DmolProblem& p, void* nll, void* pixel_nll);
  void (*dmol_backward)(const DmolProblem& p, const void* grad, const void* pixel_nll,
                        void* grad_params, const int64_t* grad_strides);
  // Both in one pass over the parameters: dmol_forward's nll and dmol_backward's
  // grad_params for grad[b] = 1 (the autograd node scales them by the output's
  // gradient), evaluating each pixel's mixture once instead of twice.
  void (*dmol_forward_with_grad)(const DmolProblem& p, void* nll, void* grad_params,
                                 const int64_t* grad_strides);
  // out[i] = f(in[i]) for the approximation f, as the kernels evaluate it.
  void (*float_math)(FloatMath f, const float* in, float* out, int64_t n);
};

// The objective (objective.h) from the kernels() in use: forward writes loss
// (one value, or [batch] for Reduction::kNone), rec and kl ([batch]) and aux
// (AuxLayout), all in the accumulation type; backward writes `out`.
void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl, void* aux);
// objective_forward, and the gradient of the loss for a loss gradient of 1
// with respect to recon in the same pass (recon's dtype, in recon's layout:
// grad_recon), where the scale is not shared; returns false, having done
// nothing, where it is.
bool objective_forward_with_grad(const ObjectiveProblem& p, void* loss, void* rec, void* kl,
                                 void* aux, void* grad_recon);
void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                        const ObjectiveGrads& out);

// kl[b] = Σ_j kl_bj and, where dim_mean is not null, dim_mean[j] = mean_b kl_bj
// (the free-bits statistics), each summed in index order, in the accumulation type.
void gaussian_kl_sums(const KlProblem& p, void* kl, void* dim_mean);

// The kernels in use: the baseline build until select_kernels() has run.
const Kernels& kernels();
// Switches kernels() to the best build this CPU runs (cpu/kernels.cpp). Called
// once, with the GIL held, when fusedvae._C is imported; false with a Python
// exception set if that failed.
bool select_kernels();
}  // namespace cpu

// Kernel variants chosen at run time (fusedvae._C's _set_cuda_wide_loads,
// _set_cuda_fast_exp, _set_cuda_mixture_fast_math and
// _set_cuda_mixture_fast_scale switch them;
// registration.cpp holds the state). A variant that has not yet run on a GPU is
// off by default: a kernel that has not run on a GPU does not replace one that
// has.
struct KernelOptions {
  // The CUDA objective's kernels load 16 bytes of the narrower of recon and
  // target per access and thread (a uint8 target 16 pixels at a time, recon's
  // matching elements in 16-byte pieces, at most 64 bytes) instead of 16 bytes
  // of recon (a uint8 target then reads 4 bytes per access beside float32).
  // Off: two H200 runs measured no gain.
  std::atomic<bool> cuda_wide_loads{false};
  // The CUDA objective's kernels with float accumulation of the logits
  // likelihoods take e^-|x| from the hardware's base-2 exponential
  // (math::FastExpOps) instead of expf. Off: 1-8 % faster on an H200, but its
  // relative error grows with |x| (about 1e-5 at |x| = 80), where the loss and
  // its gradient hold 6e-7 per element with expf (tests/test_fast_math.py).
  std::atomic<bool> cuda_fast_exp{false};
  // The CUDA discretized mixture's float32 kernels take their logarithms and
  // their exponentials of non-positive arguments from the hardware's
  // approximations (math::FastLogExpOps) instead of logf and expf. On: an H200
  // run found them within the mixture's bars, clean under compute-sanitizer and
  // 5-10 % faster (benchmarks/README.md).
  std::atomic<bool> cuda_mixture_fast_math{true};
  // With cuda_mixture_fast_math, the mixture's inverse scales and the expm1 of
  // its bin widths from the hardware's exponential as well
  // (math::FastScaleOps): a sixth fewer SASS instructions in the float32
  // kernels' loops over components. Off: not yet run on a GPU.
  std::atomic<bool> cuda_mixture_fast_scale{false};
};
KernelOptions& kernel_options();

namespace cuda {
// Same contracts as the CPU functions; `stream` is a cudaStream_t. Nothing here
// synchronises with the host.
void objective_forward(const ObjectiveProblem& p, void* loss, void* rec, void* kl, void* aux,
                       void* workspace, void* stream);
void objective_backward(const ObjectiveProblem& p, const OutputGrads& grads, const void* aux,
                        const ObjectiveGrads& out, void* stream);
// kl[b, j] (accumulation type, [batch, latent]).
void gaussian_kl_per_dim(const KlProblem& p, void* kl, void* stream);
void gaussian_kl_backward(const KlProblem& p, const KlCoefficients& coef, const KlGrads& grads,
                          void* stream);
// As cpu::gaussian_kl_sums.
void gaussian_kl_sums(const KlProblem& p, void* kl, void* dim_mean, void* stream);
void cb_log_normalizer_forward(const CbProblem& p, void* out, void* stream);
void cb_log_normalizer_backward(const CbProblem& p, const void* grad, void* grad_logits,
                                void* stream);
void dmol_forward(const DmolProblem& p, void* nll, void* pixel_nll, void* workspace, void* stream);
// As cpu's Kernels::dmol_forward_with_grad; the workspace as dmol_forward's.
void dmol_forward_with_grad(const DmolProblem& p, void* nll, void* grad_params,
                            const int64_t* grad_strides, void* workspace, void* stream);
void dmol_backward(const DmolProblem& p, const void* grad, const void* pixel_nll, void* grad_params,
                   const int64_t* grad_strides, void* stream);
int64_t dmol_workspace_bytes(const DmolProblem& p);
// Bytes of scratch objective_forward needs (per-block partial sums).
int64_t objective_workspace_bytes(const ObjectiveProblem& p, int device);
}  // namespace cuda

}  // namespace fusedvae
