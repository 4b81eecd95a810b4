// Autograd for the fusedvae ops, as C++ torch::autograd::Function nodes at the
// Autograd key (the way torchvision's ops do it): each forward op records one
// node whose backward calls the matching fused backward op once, with whatever
// subset of output gradients arrived. The backward ops compute first
// derivatives only; differentiating them is an error, never a silent zero.
//
// The forward redispatches below autograd, so the device kernels and the fake
// kernels (fusedvae/_ops.py) see plain tensors: torch.compile traces the op as
// one node, and torch.library.opcheck checks it. Forward-mode AD (jvp,
// torch.autograd.forward_ad) has no formula here and raises; torch.func's
// reverse-mode transforms (grad, vjp, jacrev) refuse C++ autograd Functions
// with PyTorch's own error.
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <unordered_map>

#include "ops.h"

namespace fusedvae {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kSecondOrderMessage =
    "fusedvae: second-order gradients (double backward, hessian, jvp of a gradient) through "
    "fusedvae::{} are not supported: the fused kernels compute first derivatives only. "
    "Differentiate fusedvae.reference.vae_loss instead where higher-order gradients are needed.";

std::string second_order_message(const char* name) {
  std::string message = kSecondOrderMessage;
  message.replace(message.find("{}"), 2, name);
  return message;
}

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp/jacfwd)
// has no formula here; without this check it would be dropped, a silent zero.
bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const OptTensor& t) { return t.has_value() && has_tangent(*t); }

template <typename... Ts>
void refuse_tangents(const char* op, const Ts&... tensors) {
  TORCH_CHECK(
      !(has_tangent(tensors) || ...), "fusedvae: forward-mode derivatives (torch.func.jvp, ",
      "jacfwd, torch.autograd.forward_ad) through fusedvae::", op,
      " are not supported: the fused kernels have reverse-mode derivatives only. Use ",
      "fusedvae.reference (the same objective in plain PyTorch) where tangents are needed.");
}

// Whether an upstream gradient is 1 everywhere: a 0-d or 1-d float or double
// CPU tensor, read in place (no operator, no copy). False for anything else,
// such as the fake and functional tensors torch.compile traces with.
template <typename T>
bool all_equal_one(const Tensor& t) {
  const T* data = t.const_data_ptr<T>();
  const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    if (data[i * stride] != T(1)) return false;
  }
  return true;
}

bool is_all_ones(const Tensor& t) {
  if (!t.defined() || !t.is_cpu() || t.dim() > 1 || at::isTensorSubclassLike(t) ||
      !t.has_storage()) {
    return false;
  }
  if (t.scalar_type() == at::kFloat) return all_equal_one<float>(t);
  if (t.scalar_type() == at::kDouble) return all_equal_one<double>(t);
  return false;
}

// ------------------------------------------------------------------ vae_loss --

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using VaeLossOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    c10::string_view, bool, c10::string_view, double, bool, double, double, const OptTensor&);
using VaeLossBackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    c10::string_view, bool, c10::string_view, double, bool, double, double, std::array<bool, 4>,
    const OptTensor&, bool);
using VaeLossAndGradOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    c10::string_view, bool, c10::string_view, double, bool, double, double, const OptTensor&);

const c10::TypedOperatorHandle<VaeLossOp>& vae_loss_op() {
  static const auto op = find_op<VaeLossOp>("fusedvae::vae_loss");
  return op;
}

const c10::TypedOperatorHandle<VaeLossBackwardOp>& vae_loss_backward_op() {
  static const auto op = find_op<VaeLossBackwardOp>("fusedvae::vae_loss_backward");
  return op;
}

const c10::TypedOperatorHandle<VaeLossAndGradOp>& vae_loss_and_grad_op() {
  static const auto op = find_op<VaeLossAndGradOp>("fusedvae::vae_loss_and_grad");
  return op;
}

// The arguments of vae_loss that are no inputs of the node (the weight
// receives no gradient), kept for the backward.
struct VaeLossOptions {
  std::string likelihood;
  bool logits;
  std::string reduction;
  double log_scale_value;
  bool optimal_scale;
  double beta_value;
  double free_bits;
  OptTensor weight;
};

// On the CPU, with float32 or float64 recon that requires grad and no log-scale
// shared by the batch, the forward also computes recon's gradient for
// loss.backward() (a loss gradient of 1, no gradient of rec or kl) in the same
// pass over the data (vae_loss_and_grad: each element's likelihood is evaluated
// once per step, not once per direction): c1_b·(w·∂ℓ/∂x), rounded as the
// two-pass kernel rounds it. The first backward returns that tensor as it is
// where its upstream gradients are loss.backward()'s, and otherwise multiplies
// it in place by the factors c_b / c1 that vae_loss_backward returns with
// recon_coefficients=True (c_b the per-sample coefficients of its gradients, c1
// loss.backward()'s): within 4 units of roundoff of the two-pass result, and
// bitwise it where the factors are powers of two (a loss scaled by 2^k;
// reduction "none" or "sum", whose c1 is 1). A later backward through a
// retained graph and a backward that builds a graph take the two passes; so do
// 16-bit recon (scaling a 16-bit gradient would round it twice), a shared
// log-scale (its gradient couples the samples) and a per-element log-scale that
// requires grad.
class VaeLossFunction : public torch::autograd::Function<VaeLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& recon, const Tensor& target,
                               const Tensor& mu, const Tensor& logvar, const OptTensor& log_scale,
                               const OptTensor& beta, const VaeLossOptions& o) {
    Tensor loss, rec, kl, aux;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      const at::ScalarType dtype = recon.scalar_type();
      const bool one_pass = recon.device().is_cpu() &&
                            (dtype == at::kFloat || dtype == at::kDouble) && requires_grad(recon) &&
                            !requires_grad(log_scale) &&
                            recon_gradient_is_per_sample(o.likelihood, o.logits, log_scale);
      if (one_pass) {
        Tensor grad_recon;
        std::tie(loss, rec, kl, aux, grad_recon) = vae_loss_and_grad_op().call(
            recon, target, mu, logvar, log_scale, beta, o.likelihood, o.logits, o.reduction,
            o.log_scale_value, o.optimal_scale, o.beta_value, o.free_bits, o.weight);
        ctx->saved_data["grad_recon"] = grad_recon;
      } else {
        std::tie(loss, rec, kl, aux) = vae_loss_op().call(
            recon, target, mu, logvar, log_scale, beta, o.likelihood, o.logits, o.reduction,
            o.log_scale_value, o.optimal_scale, o.beta_value, o.free_bits, o.weight);
      }
    }
    ctx->save_for_backward({recon, target, mu, logvar, log_scale.value_or(Tensor()),
                            beta.value_or(Tensor()), aux, o.weight.value_or(Tensor())});
    ctx->saved_data["likelihood"] = o.likelihood;
    ctx->saved_data["logits"] = o.logits;
    ctx->saved_data["reduction"] = o.reduction;
    ctx->saved_data["log_scale_value"] = o.log_scale_value;
    ctx->saved_data["optimal_scale"] = o.optimal_scale;
    ctx->saved_data["beta_value"] = o.beta_value;
    ctx->saved_data["free_bits"] = o.free_bits;
    ctx->mark_non_differentiable({aux});
    ctx->set_materialize_grads(false);
    return {loss, rec, kl, aux};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(1),
                "fusedvae: the loss has no gradient with respect to target");
    const variable_list saved = ctx->get_saved_variables();
    // The node's inputs are the tensors given: log_scale and beta only when present.
    const bool has_scale = saved[4].defined();
    const bool has_beta = saved[5].defined();
    const bool scale_grad = has_scale && ctx->needs_input_grad(4);
    const bool beta_grad = has_beta && ctx->needs_input_grad(has_scale ? 5 : 4);
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0),
                                      ctx->needs_input_grad(2) || ctx->needs_input_grad(3),
                                      scale_grad, beta_grad};
    variable_list result(7);
    const bool any_grad = grads[0].defined() || grads[1].defined() || grads[2].defined();
    if (!any_grad || !(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    auto& d = ctx->saved_data;
    const VaeLossOptions o{d["likelihood"].toStringRef(), d["logits"].toBool(),
                           d["reduction"].toStringRef(),  d["log_scale_value"].toDouble(),
                           d["optimal_scale"].toBool(),   d["beta_value"].toDouble(),
                           d["free_bits"].toDouble(),     optional(saved[7])};
    // The forward's gradient for loss.backward(), used once (a later backward
    // computes it again).
    at::IValue& computed = d["grad_recon"];
    const bool use_computed = mask[0] && computed.isTensor() && !at::GradMode::is_enabled();
    const bool as_computed =
        use_computed && !grads[1].defined() && !grads[2].defined() && is_all_ones(grads[0]);
    Tensor grad_recon, grad_mu, grad_logvar, grad_scale, grad_beta;
    const std::array<bool, 4> op_mask = {mask[0] && !as_computed, mask[1], mask[2], mask[3]};
    if (op_mask[0] || op_mask[1] || op_mask[2] || op_mask[3]) {
      std::tie(grad_recon, grad_mu, grad_logvar, grad_scale, grad_beta) =
          vae_loss_backward_op().call(
              optional(grads[0]), optional(grads[1]), optional(grads[2]), saved[0], saved[1],
              saved[2], saved[3], optional(saved[4]), optional(saved[5]), saved[6], o.likelihood,
              o.logits, o.reduction, o.log_scale_value, o.optimal_scale, o.beta_value, o.free_bits,
              op_mask, o.weight, /*recon_coefficients=*/use_computed);
    }
    if (use_computed) {
      Tensor computed_grad = computed.toTensor();
      computed = at::IValue();
      if (!as_computed) {
        // Symbolic sizes: a batch marked dynamic under torch.compile stays so.
        std::vector<c10::SymInt> per_sample(static_cast<size_t>(computed_grad.dim()),
                                            c10::SymInt(1));
        per_sample[0] = grad_recon.sym_size(0);
        computed_grad.mul_(grad_recon.view_symint(per_sample));
      }
      grad_recon = computed_grad;
    }
    if (mask[0]) result[0] = grad_recon;
    if (ctx->needs_input_grad(2)) result[2] = grad_mu;
    if (ctx->needs_input_grad(3)) result[3] = grad_logvar;
    if (mask[2]) result[4] = grad_scale;
    if (mask[3]) result[5] = grad_beta;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> vae_loss_autograd(
    const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
    const OptTensor& log_scale, const OptTensor& beta, c10::string_view likelihood, bool logits,
    c10::string_view reduction, double log_scale_value, bool optimal_scale, double beta_value,
    double free_bits, const OptTensor& weight) {
  refuse_tangents("vae_loss", recon, target, mu, logvar, log_scale, beta, weight);
  const bool record = at::GradMode::is_enabled() &&
                      (requires_grad(recon) || requires_grad(mu) || requires_grad(logvar) ||
                       requires_grad(log_scale) || requires_grad(beta));
  if (!record) {  // no_grad, inference_mode, or nothing to differentiate: nothing is saved
    at::AutoDispatchBelowADInplaceOrView below;
    return vae_loss_op().call(recon, target, mu, logvar, log_scale, beta, likelihood, logits,
                              reduction, log_scale_value, optimal_scale, beta_value, free_bits,
                              weight);
  }
  const VaeLossOptions options{std::string(likelihood),
                               logits,
                               std::string(reduction),
                               log_scale_value,
                               optimal_scale,
                               beta_value,
                               free_bits,
                               weight};
  const variable_list out =
      VaeLossFunction::apply(recon, target, mu, logvar, log_scale, beta, options);
  return {out[0], out[1], out[2], out[3]};
}

// ------------------------------------------------------- elementwise helpers --

using UnaryOp = Tensor(const Tensor&);
using PairOp = Tensor(const Tensor&, const Tensor&);
using PairToPairOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&);

class GaussianKlPerDimFunction : public torch::autograd::Function<GaussianKlPerDimFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({mu, logvar});
    static const auto op = find_op<PairOp>("fusedvae::gaussian_kl_per_dim");
    return {op.call(mu, logvar)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = find_op<PairToPairOp>("fusedvae::gaussian_kl_per_dim_backward");
    auto [grad_mu, grad_logvar] = op.call(grads[0], saved[0], saved[1]);
    return {grad_mu, grad_logvar};
  }
};

Tensor gaussian_kl_per_dim_autograd(const Tensor& mu, const Tensor& logvar) {
  refuse_tangents("gaussian_kl_per_dim", mu, logvar);
  return GaussianKlPerDimFunction::apply(mu, logvar)[0];
}

class CbLogNormalizerFunction : public torch::autograd::Function<CbLogNormalizerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({logits});
    static const auto op = find_op<UnaryOp>("fusedvae::cb_log_normalizer");
    return {op.call(logits)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = find_op<PairOp>("fusedvae::cb_log_normalizer_backward");
    return {op.call(grads[0], saved[0])};
  }
};

Tensor cb_log_normalizer_autograd(const Tensor& logits) {
  refuse_tangents("cb_log_normalizer", logits);
  return CbLogNormalizerFunction::apply(logits)[0];
}

using DmolOp = Tensor(const Tensor&, const Tensor&, int64_t, double);
using DmolPairOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double);
using DmolBackwardOp = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                              const OptTensor&);

// The target is data: the op has no gradient for it (the Python API refuses
// a target that requires grad).
//
// On the CPU, with float32 or float64 params, the forward also computes the
// gradient for an output gradient of 1, in the same pass over the pixels
// (dmol_nll_and_grad: each pixel's mixture evaluated once instead of twice),
// and the first backward scales it in place by the output's gradient (where
// that is not 1 everywhere) and returns it. A later backward through the same
// graph (retain_graph=True) and a backward that builds a graph
// (create_graph=True, refused by dmol_nll_backward) run dmol_nll_backward.
// 16-bit params keep the two passes: scaling a 16-bit gradient would round it
// twice. On CUDA, where a thread keeps no cache of the components (the one
// pass would be two) and scaling would read and write the gradient once more,
// the forward keeps each pixel's NLL (dmol_nll_and_pixel_nll) and the
// backward, given it, takes one pass over the components and writes the
// scaled gradient: for every dtype, two passes per step and the gradient
// written once.
class DmolFunction : public torch::autograd::Function<DmolFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& params, const Tensor& target,
                               int64_t bits, double log_scale_min) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["log_scale_min"] = log_scale_min;
    if (params.is_cuda()) {
      static const auto op = find_op<DmolPairOp>("fusedvae::dmol_nll_and_pixel_nll");
      auto [nll, pixel_nll] = op.call(params, target, bits, log_scale_min);
      ctx->save_for_backward({params, target, pixel_nll});
      return {nll};
    }
    ctx->save_for_backward({params, target});
    const at::ScalarType dtype = params.scalar_type();
    if (dtype == at::kFloat || dtype == at::kDouble) {
      static const auto op = find_op<DmolPairOp>("fusedvae::dmol_nll_and_grad");
      auto [nll, grad_params] = op.call(params, target, bits, log_scale_min);
      ctx->saved_data["grad_params"] = grad_params;
      return {nll};
    }
    static const auto op = find_op<DmolOp>("fusedvae::dmol_nll");
    return {op.call(params, target, bits, log_scale_min)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::IValue& computed = ctx->saved_data["grad_params"];
    if (computed.isTensor() && !at::GradMode::is_enabled()) {
      Tensor grad_params = computed.toTensor();
      computed = at::IValue();  // used up: a later backward computes it again
      // nll.sum().backward() (the per-sample weights all 1) takes it as it is.
      if (!is_all_ones(grads[0])) {
        grad_params.mul_(grads[0].to(grad_params.scalar_type()).reshape({-1, 1, 1, 1}));
      }
      return {grad_params, Tensor(), Tensor(), Tensor()};
    }
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = find_op<DmolBackwardOp>("fusedvae::dmol_nll_backward");
    return {op.call(grads[0], saved[0], saved[1], ctx->saved_data["bits"].toInt(),
                    ctx->saved_data["log_scale_min"].toDouble(),
                    saved.size() > 2 ? OptTensor(saved[2]) : std::nullopt),
            Tensor(), Tensor(), Tensor()};
  }
};

Tensor dmol_nll_autograd(const Tensor& params, const Tensor& target, int64_t bits,
                         double log_scale_min) {
  refuse_tangents("dmol_nll", params, target);
  if (!at::GradMode::is_enabled() || !requires_grad(params)) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = find_op<DmolOp>("fusedvae::dmol_nll");
    return op.call(params, target, bits, log_scale_min);
  }
  return DmolFunction::apply(params, target, bits, log_scale_min)[0];
}

// --------------------------------------------------- KL over latent groups --

using KlGroupsOp = std::tuple<Tensor, Tensor, Tensor>(at::TensorList, at::TensorList,
                                                      at::TensorList, at::TensorList,
                                                      at::ArrayRef<double>);
using TensorLists =
    std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;
using KlGroupsBackwardOp = TensorLists(const OptTensor&, const OptTensor&, at::TensorList,
                                       at::TensorList, at::TensorList, at::TensorList,
                                       const Tensor&, at::ArrayRef<double>);

const c10::TypedOperatorHandle<KlGroupsOp>& gaussian_kl_op() {
  static const auto op = find_op<KlGroupsOp>("fusedvae::gaussian_kl");
  return op;
}
const c10::TypedOperatorHandle<KlGroupsBackwardOp>& gaussian_kl_backward_op() {
  static const auto op = find_op<KlGroupsBackwardOp>("fusedvae::gaussian_kl_backward");
  return op;
}

// The saved tensors of GaussianKlFunction: mu, logvar, then the priors (where
// given), each one per group, then dim_mean.
struct KlSaved {
  std::vector<Tensor> mu, logvar, prior_mu, prior_logvar;
  Tensor dim_mean;
  KlSaved(const variable_list& saved, size_t groups, bool prior) {
    auto take = [&](size_t first) {
      return std::vector<Tensor>(saved.begin() + first, saved.begin() + first + groups);
    };
    mu = take(0);
    logvar = take(groups);
    if (prior) {
      prior_mu = take(2 * groups);
      prior_logvar = take(3 * groups);
    }
    dim_mean = saved.back();
  }
};

class GaussianKlFunction : public torch::autograd::Function<GaussianKlFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList mu, at::TensorList logvar,
                               at::TensorList prior_mu, at::TensorList prior_logvar,
                               const std::vector<double>& free_bits) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [kl, kl_term, dim_mean] =
        gaussian_kl_op().call(mu, logvar, prior_mu, prior_logvar, free_bits);
    variable_list saved;
    for (at::TensorList list : {mu, logvar, prior_mu, prior_logvar}) {
      saved.insert(saved.end(), list.begin(), list.end());
    }
    saved.push_back(dim_mean);
    ctx->save_for_backward(saved);
    ctx->saved_data["groups"] = static_cast<int64_t>(mu.size());
    ctx->saved_data["prior"] = !prior_mu.empty();
    ctx->saved_data["free_bits"] = free_bits;
    ctx->mark_non_differentiable({dim_mean});
    return {kl, kl_term, dim_mean};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const size_t groups = static_cast<size_t>(ctx->saved_data["groups"].toInt());
    const bool prior = ctx->saved_data["prior"].toBool();
    const KlSaved s(ctx->get_saved_variables(), groups, prior);
    const std::vector<double> free_bits = ctx->saved_data["free_bits"].toDoubleVector();
    // One gradient per input tensor, in input order, then none for free_bits.
    variable_list result;
    if (!grads[0].defined() && !grads[1].defined()) {
      result.resize((prior ? 4 : 2) * groups + 1);
      return result;
    }
    auto [grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar] =
        gaussian_kl_backward_op().call(optional(grads[0]), optional(grads[1]), s.mu, s.logvar,
                                       s.prior_mu, s.prior_logvar, s.dim_mean, free_bits);
    for (auto* list : {&grad_mu, &grad_logvar, &grad_prior_mu, &grad_prior_logvar}) {
      result.insert(result.end(), list->begin(), list->end());
    }
    result.emplace_back();
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> gaussian_kl_autograd(at::TensorList mu, at::TensorList logvar,
                                                        at::TensorList prior_mu,
                                                        at::TensorList prior_logvar,
                                                        at::ArrayRef<double> free_bits) {
  bool record = false;
  for (at::TensorList list : {mu, logvar, prior_mu, prior_logvar}) {
    for (const Tensor& t : list) {
      refuse_tangents("gaussian_kl", t);
      record = record || requires_grad(t);
    }
  }
  if (!at::GradMode::is_enabled() || !record) {
    at::AutoDispatchBelowADInplaceOrView below;
    return gaussian_kl_op().call(mu, logvar, prior_mu, prior_logvar, free_bits);
  }
  const variable_list out =
      GaussianKlFunction::apply(mu, logvar, prior_mu, prior_logvar, free_bits.vec());
  return {out[0], out[1], out[2]};
}

// ------------------------------------------------------------ backward ops --
// The outputs of a fused backward op carry a node that refuses to be
// differentiated: create_graph=True still works as long as nothing
// differentiates through a fused backward.

struct Computed {
  variable_list outputs;
};

class SecondOrderError : public torch::autograd::Function<SecondOrderError> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList /*inputs*/,
                               const Computed& computed, const char* name) {
    ctx->saved_data["name"] = std::string(name);
    return computed.outputs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, second_order_message(ctx->saved_data["name"].toStringRef().c_str()));
  }
};

variable_list refuse_second_order(const char* name, const variable_list& inputs,
                                  variable_list outputs) {
  if (!at::GradMode::is_enabled()) return outputs;
  variable_list differentiable;
  for (const Tensor& t : inputs) {
    if (requires_grad(t)) differentiable.push_back(t);
  }
  if (differentiable.empty()) return outputs;
  return SecondOrderError::apply(at::TensorList(differentiable), Computed{std::move(outputs)},
                                 name);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vae_loss_backward_autograd(
    const OptTensor& grad_loss, const OptTensor& grad_rec, const OptTensor& grad_kl,
    const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
    const OptTensor& log_scale, const OptTensor& beta, const Tensor& aux,
    c10::string_view likelihood, bool logits, c10::string_view reduction, double log_scale_value,
    bool optimal_scale, double beta_value, double free_bits, std::array<bool, 4> output_mask,
    const OptTensor& weight, bool recon_coefficients) {
  Tensor a, b, c, d, e;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(a, b, c, d, e) = vae_loss_backward_op().call(
        grad_loss, grad_rec, grad_kl, recon, target, mu, logvar, log_scale, beta, aux, likelihood,
        logits, reduction, log_scale_value, optimal_scale, beta_value, free_bits, output_mask,
        weight, recon_coefficients);
  }
  const variable_list out = refuse_second_order(
      "vae_loss_backward",
      {grad_loss.value_or(Tensor()), grad_rec.value_or(Tensor()), grad_kl.value_or(Tensor()), recon,
       mu, logvar, log_scale.value_or(Tensor()), beta.value_or(Tensor())},
      {a, b, c, d, e});
  return {out[0], out[1], out[2], out[3], out[4]};
}

// vae_loss_and_grad called directly: its outputs have no gradient.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vae_loss_and_grad_autograd(
    const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
    const OptTensor& log_scale, const OptTensor& beta, c10::string_view likelihood, bool logits,
    c10::string_view reduction, double log_scale_value, bool optimal_scale, double beta_value,
    double free_bits, const OptTensor& weight) {
  refuse_tangents("vae_loss_and_grad", recon, target, mu, logvar, log_scale, beta, weight);
  Tensor a, b, c, d, e;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(a, b, c, d, e) = vae_loss_and_grad_op().call(
        recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction, log_scale_value,
        optimal_scale, beta_value, free_bits, weight);
  }
  const variable_list out = refuse_second_order(
      "vae_loss_and_grad",
      {recon, mu, logvar, log_scale.value_or(Tensor()), beta.value_or(Tensor())}, {a, b, c, d, e});
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<Tensor, Tensor> gaussian_kl_per_dim_backward_autograd(const Tensor& grad,
                                                                 const Tensor& mu,
                                                                 const Tensor& logvar) {
  Tensor a, b;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = find_op<PairToPairOp>("fusedvae::gaussian_kl_per_dim_backward");
    std::tie(a, b) = op.call(grad, mu, logvar);
  }
  const variable_list out =
      refuse_second_order("gaussian_kl_per_dim_backward", {grad, mu, logvar}, {a, b});
  return {out[0], out[1]};
}

TensorLists gaussian_kl_backward_autograd(const OptTensor& grad_kl, const OptTensor& grad_kl_term,
                                          at::TensorList mu, at::TensorList logvar,
                                          at::TensorList prior_mu, at::TensorList prior_logvar,
                                          const Tensor& dim_mean, at::ArrayRef<double> free_bits) {
  TensorLists grads;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    grads = gaussian_kl_backward_op().call(grad_kl, grad_kl_term, mu, logvar, prior_mu,
                                           prior_logvar, dim_mean, free_bits);
  }
  variable_list inputs{grad_kl.value_or(Tensor()), grad_kl_term.value_or(Tensor())};
  variable_list outputs;
  for (at::TensorList list : {mu, logvar, prior_mu, prior_logvar}) {
    inputs.insert(inputs.end(), list.begin(), list.end());
  }
  auto& [grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar] = grads;
  for (auto* list : {&grad_mu, &grad_logvar, &grad_prior_mu, &grad_prior_logvar}) {
    outputs.insert(outputs.end(), list->begin(), list->end());
  }
  outputs = refuse_second_order("gaussian_kl_backward", inputs, std::move(outputs));
  size_t next = 0;
  for (auto* list : {&grad_mu, &grad_logvar, &grad_prior_mu, &grad_prior_logvar}) {
    for (Tensor& t : *list) t = outputs[next++];
  }
  return grads;
}

Tensor cb_log_normalizer_backward_autograd(const Tensor& grad, const Tensor& logits) {
  Tensor a;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = find_op<PairOp>("fusedvae::cb_log_normalizer_backward");
    a = op.call(grad, logits);
  }
  return refuse_second_order("cb_log_normalizer_backward", {grad, logits}, {a})[0];
}

// The ops DmolFunction's forward runs, called directly: no derivative of their own.
constexpr char kDmolNllAndGrad[] = "dmol_nll_and_grad";
constexpr char kDmolNllAndPixelNll[] = "dmol_nll_and_pixel_nll";
template <const char* kName>
std::tuple<Tensor, Tensor> dmol_pair_autograd(const Tensor& params, const Tensor& target,
                                              int64_t bits, double log_scale_min) {
  Tensor a, b;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = find_op<DmolPairOp>((std::string("fusedvae::") + kName).c_str());
    std::tie(a, b) = op.call(params, target, bits, log_scale_min);
  }
  const variable_list out = refuse_second_order(kName, {params}, {a, b});
  return {out[0], out[1]};
}

Tensor dmol_nll_backward_autograd(const Tensor& grad, const Tensor& params, const Tensor& target,
                                  int64_t bits, double log_scale_min, const OptTensor& pixel_nll) {
  Tensor a;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = find_op<DmolBackwardOp>("fusedvae::dmol_nll_backward");
    a = op.call(grad, params, target, bits, log_scale_min, pixel_nll);
  }
  return refuse_second_order("dmol_nll_backward", {grad, params}, {a})[0];
}

}  // namespace
}  // namespace fusedvae

TORCH_LIBRARY_IMPL(fusedvae, Autograd, m) {
  using namespace fusedvae;
  m.impl("vae_loss", &vae_loss_autograd);
  m.impl("vae_loss_backward", &vae_loss_backward_autograd);
  m.impl("vae_loss_and_grad", &vae_loss_and_grad_autograd);
  m.impl("gaussian_kl_per_dim", &gaussian_kl_per_dim_autograd);
  m.impl("gaussian_kl_per_dim_backward", &gaussian_kl_per_dim_backward_autograd);
  m.impl("gaussian_kl", &gaussian_kl_autograd);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_autograd);
  m.impl("cb_log_normalizer", &cb_log_normalizer_autograd);
  m.impl("cb_log_normalizer_backward", &cb_log_normalizer_backward_autograd);
  m.impl("dmol_nll", &dmol_nll_autograd);
  m.impl(kDmolNllAndGrad, &dmol_pair_autograd<kDmolNllAndGrad>);
  m.impl(kDmolNllAndPixelNll, &dmol_pair_autograd<kDmolNllAndPixelNll>);
  m.impl("dmol_nll_backward", &dmol_nll_backward_autograd);
}
