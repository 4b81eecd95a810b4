#include "ops.h"

#include <ATen/ExpandUtils.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fusedvae {
namespace {

using at::Tensor;

DType to_dtype(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fusedvae: expected ", name,
                       " to be float32, float64, float16 or bfloat16, got ", type);
  }
}
DType to_dtype(const Tensor& t, const char* name) { return to_dtype(t.scalar_type(), name); }

// The target is read in its own dtype: a float64 one only beside a float64
// recon (whose sums are float64), any other floating one, uint8 or bool beside
// the others (kernels.h).
DType to_target_dtype(const Tensor& target, const Tensor& recon) {
  const at::ScalarType t = target.scalar_type();
  if (t == at::kByte) return DType::kUInt8;
  if (t == at::kBool) return DType::kBool;
  TORCH_CHECK_TYPE(at::isFloatingType(t), "fusedvae: expected target to be a floating-point, ",
                   "uint8 or bool tensor, got ", t);
  const bool wide = recon.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE((t == at::kDouble) == wide, "fusedvae: expected target of dtype ",
                   wide ? "Double, Byte or Bool" : "Float, Half, BFloat16, Byte or Bool",
                   " beside a recon of dtype ", recon.scalar_type(), ", got ", t);
  return to_dtype(target, "target");
}

// Per-sample results and upstream gradients are in the accumulation type.
at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_same_device(const Tensor& t, const char* name, const Tensor& recon, const char* ref) {
  TORCH_CHECK(t.device() == recon.device(), "fusedvae: expected ", name, " on the device of ", ref,
              " (", recon.device(), "), got ", t.device());
}

void check_same_shape(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "fusedvae: expected ", name, " of shape ",
                    ref.sizes(), " (the shape of ", ref_name, "), got ", t.sizes());
}

// Same element order in memory: dense with equal strides wherever a size is > 1.
bool same_layout(const Tensor& a, const Tensor& b) {
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Each sample one dense block of numel/size(0) elements, in order.
bool is_sample_blocked(const Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) == t.numel() / t.size(0);
}

// The layout the kernels run in: `recon` itself when it is sample-blocked
// (contiguous, channels_last and any other dense order with the batch
// outermost), a contiguous copy otherwise.
Tensor working_layout(const Tensor& recon) {
  return is_sample_blocked(recon) ? recon : recon.contiguous();
}

// `t` in the element order of `ref`, copied only when it differs.
Tensor in_layout_of(const Tensor& t, const Tensor& ref) {
  if (same_layout(t, ref)) return t;
  Tensor out = at::empty_like(ref, t.options());
  out.copy_(t);
  return out;
}

// An output shaped like `like` (at::empty_like's layout, which is what the
// fake kernels promise), and the buffer the kernel writes: the output itself
// when its layout is the working one, else a scratch tensor copied over after.
struct Output {
  Tensor result;
  Tensor work;
  Output(const Tensor& like, const Tensor& ref) : result(at::empty_like(like)) {
    work = same_layout(result, ref) ? result : at::empty_like(ref, like.options());
  }
  Tensor finish() {
    if (!work.is_same(result)) result.copy_(work);
    return result;
  }
};

// The id of the likelihood called `likelihood` whose form of recon `logits`
// selects (math::kLikelihoodTable; a location likelihood ignores `logits`).
int parse_likelihood(c10::string_view likelihood, bool logits) {
  std::string names;
  for (size_t id = 0; id < math::kLikelihoodTable.size(); ++id) {
    const math::LikelihoodInfo& row = math::kLikelihoodTable[id];
    if (likelihood == row.name && (row.form == math::ReconForm::kLocation ||
                                   (row.form == math::ReconForm::kLogits) == logits)) {
      return static_cast<int>(id);
    }
    if (names.find(std::string("'") + row.name + "'") == std::string::npos) {
      names += (names.empty() ? "'" : ", '") + std::string(row.name) + "'";
    }
  }
  TORCH_CHECK_VALUE(false, "fusedvae: expected likelihood to be one of ", names, ", got '",
                    std::string(likelihood), "'");
}

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "batchmean") return Reduction::kBatchMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false,
                    "fusedvae: expected reduction to be 'batchmean', 'sum', 'mean' or 'none', "
                    "got '",
                    std::string(reduction), "'");
}

// A 0-d tensor's value where the kernels read it: on the device of `ref` in
// the accumulation type (no copy when it is already), or, for a CPU tensor
// beside a CUDA `ref`, read on the host into `host_value` (no device sync).
const void* scalar_operand(const Tensor& t, const char* name, const Tensor& ref, at::ScalarType acc,
                           Tensor& holder, double& host_value) {
  TORCH_CHECK_VALUE(t.dim() == 0, "fusedvae: expected ", name, " to be a 0-d tensor, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "fusedvae: expected ", name,
                   " to be a floating-point tensor, got ", t.scalar_type());
  if (t.device() != ref.device()) {
    TORCH_CHECK(t.device().is_cpu(), "fusedvae: expected ", name, " on the device of recon (",
                ref.device(), ") or the CPU, got ", t.device());
    host_value = t.item<double>();
    return nullptr;
  }
  holder = t.scalar_type() == acc ? t : t.to(acc);
  return holder.const_data_ptr();
}

// A scaled likelihood's log-scale is per element where log_scale is a tensor
// of at least one dimension (broadcast to recon); otherwise one scale is shared
// by the batch (a number, a 0-d tensor, or optimal_scale's).
bool log_scale_is_per_element(const std::optional<Tensor>& log_scale) {
  return log_scale.has_value() && log_scale->dim() > 0;
}

// The arguments of vae_loss and vae_loss_backward, checked, in the working
// layout, as the kernels' ObjectiveProblem.
struct ObjectiveInputs {
  Tensor recon, target, mu, logvar, log_scale, log_scale_scalar, beta, weight, weight_sums;
  bool per_element_scale = false;
  at::ScalarType acc;
  ObjectiveProblem problem;

  ObjectiveInputs(const Tensor& recon_in, const Tensor& target_in, const Tensor& mu_in,
                  const Tensor& logvar_in, const std::optional<Tensor>& log_scale_in,
                  const std::optional<Tensor>& beta_in, c10::string_view likelihood, bool logits,
                  c10::string_view reduction, double log_scale_value, bool optimal_scale,
                  double beta_value, double free_bits, const std::optional<Tensor>& weight_in) {
    const int kind = parse_likelihood(likelihood, logits);
    const Reduction reduction_kind = parse_reduction(reduction);
    const DType dtype = to_dtype(recon_in, "recon");
    TORCH_CHECK_VALUE(recon_in.dim() >= 1,
                      "fusedvae: expected recon of shape [batch, ...], got a 0-d tensor");
    check_same_shape(target_in, "target", recon_in, "recon");
    check_same_device(target_in, "target", recon_in, "recon");
    const DType target_dtype = to_target_dtype(target_in, recon_in);
    acc = accumulate_type(recon_in.scalar_type());

    const DType kl_dtype = to_dtype(mu_in, "mu");
    TORCH_CHECK_VALUE(mu_in.dim() >= 1 && mu_in.size(0) == recon_in.size(0),
                      "fusedvae: expected mu of shape [", recon_in.size(0),
                      ", ...] (the batch size of recon), got ", mu_in.sizes());
    check_same_shape(logvar_in, "logvar", mu_in, "mu");
    check_same_device(mu_in, "mu", recon_in, "recon");
    check_same_device(logvar_in, "logvar", recon_in, "recon");
    TORCH_CHECK_TYPE(logvar_in.scalar_type() == mu_in.scalar_type(), "fusedvae: expected logvar ",
                     "of dtype ", mu_in.scalar_type(), " (the dtype of mu), got ",
                     logvar_in.scalar_type());
    TORCH_CHECK_TYPE(accumulate_type(mu_in.scalar_type()) == acc, "fusedvae: expected mu of dtype ",
                     acc == at::kDouble ? "Double" : "Float, Half or BFloat16",
                     " beside a recon of dtype ", recon_in.scalar_type(), ", got ",
                     mu_in.scalar_type());
    TORCH_CHECK_VALUE(std::isfinite(free_bits) && free_bits >= 0,
                      "fusedvae: expected free_bits to be a finite number >= 0, got ", free_bits);
    TORCH_CHECK_VALUE(std::isfinite(beta_value) && beta_value >= 0,
                      "fusedvae: expected beta_value to be a finite number >= 0, got ", beta_value);
    TORCH_CHECK_VALUE(std::isfinite(log_scale_value),
                      "fusedvae: expected log_scale_value to be finite, got ", log_scale_value);
    TORCH_CHECK_VALUE(!(optimal_scale && log_scale_in.has_value()),
                      "fusedvae: expected no log_scale tensor with optimal_scale=True");

    ScaleKind scale = ScaleKind::kNone;
    const bool scaled = math::kLikelihoodTable[kind].has_scale;
    bool shared_scale = false;
    TORCH_CHECK_VALUE(scaled || (!log_scale_in.has_value() && !optimal_scale),
                      "fusedvae: likelihood '", std::string(likelihood), "' takes no log_scale");
    recon = working_layout(recon_in);
    target = in_layout_of(target_in, recon);
    const void* scale_scalar = nullptr;
    if (scaled) {
      if (log_scale_is_per_element(log_scale_in)) {
        const Tensor& s = *log_scale_in;
        check_same_device(s, "log_scale", recon_in, "recon");
        TORCH_CHECK_VALUE(
            s.dim() <= recon_in.dim() && at::is_expandable_to(s.sizes(), recon_in.sizes()),
            "fusedvae: expected log_scale of 0 dimensions or broadcastable to ", recon_in.sizes(),
            " (the shape of recon), got ", s.sizes());
        const at::ScalarType r = recon_in.scalar_type();
        const bool narrow = r == at::kHalf || r == at::kBFloat16;
        TORCH_CHECK_TYPE(s.scalar_type() == r || (narrow && s.scalar_type() == at::kFloat),
                         "fusedvae: expected log_scale of dtype ", r, " (the dtype of recon)",
                         narrow ? " or Float" : "", ", got ", s.scalar_type());
        log_scale =
            in_layout_of(s.sizes() == recon_in.sizes() ? s : s.expand(recon_in.sizes()), recon);
        per_element_scale = true;
      } else {
        shared_scale = true;
        if (optimal_scale) {
          scale = ScaleKind::kOptimal;
        } else if (log_scale_in.has_value()) {
          scale_scalar = scalar_operand(*log_scale_in, "log_scale", recon_in, acc, log_scale_scalar,
                                        log_scale_value);
          scale = scale_scalar != nullptr ? ScaleKind::kTensor : ScaleKind::kValue;
        } else {
          scale = ScaleKind::kValue;
        }
      }
    }
    const void* beta_ptr = nullptr;
    if (beta_in.has_value()) {
      beta_ptr = scalar_operand(*beta_in, "beta", recon_in, acc, beta, beta_value);
    }
    mu = mu_in.contiguous();
    logvar = logvar_in.contiguous();

    const int64_t batch = recon.size(0);
    const int64_t n = batch == 0 ? 0 : recon.numel() / batch;
    const int64_t j = batch == 0 ? 0 : mu.numel() / batch;
    problem.recon = ReconProblem{recon.const_data_ptr(),
                                 target.const_data_ptr(),
                                 per_element_scale ? log_scale.const_data_ptr() : nullptr,
                                 dtype,
                                 target_dtype,
                                 per_element_scale ? to_dtype(log_scale, "log_scale") : dtype,
                                 batch,
                                 n,
                                 kind,
                                 shared_scale};
    problem.kl = KlProblem{mu.const_data_ptr(), logvar.const_data_ptr(), kl_dtype, batch, j};
    problem.objective =
        Objective{batch, n, j, reduction_kind, scale, log_scale_value, beta_value, free_bits};
    problem.log_scale_scalar = scale_scalar;
    problem.beta = beta_ptr;
    problem.recon.weight = WeightView{nullptr, 0, 1, {1}, {0}};
    problem.weight_sums = nullptr;
    problem.weight_sums_stride = 0;
    if (weight_in.has_value()) set_weight(*weight_in, recon_in, shared_scale);
  }

  // The weight as the kernels read it (WeightView): in the accumulation type,
  // broadcast by strides, and with a shared scale each sample's weight sum.
  void set_weight(const Tensor& w, const Tensor& recon_in, bool shared_scale) {
    check_same_device(w, "weight", recon_in, "recon");
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                     "fusedvae: expected weight to be a floating-point tensor, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(
        w.dim() <= recon_in.dim() && at::is_expandable_to(w.sizes(), recon_in.sizes()),
        "fusedvae: expected weight broadcastable to ", recon_in.sizes(),
        " (the shape of recon), got ", w.sizes());
    weight = w.scalar_type() == acc ? w : w.to(acc);
    const Tensor expanded = weight.expand(recon_in.sizes());  // a view, stride 0 where broadcast
    // The sample's dimensions in the working layout's memory order, outermost
    // first, with the weight's strides; size-1 dimensions dropped, adjacent
    // ones merged where the weight's strides allow.
    std::vector<int64_t> dims;
    for (int64_t d = 1; d < recon.dim(); ++d) {
      if (recon.size(d) > 1) dims.push_back(d);
    }
    std::stable_sort(dims.begin(), dims.end(),
                     [&](int64_t a, int64_t b) { return recon.stride(a) > recon.stride(b); });
    WeightView& view = problem.recon.weight;
    view.dims = 0;
    for (int64_t d : dims) {
      const int64_t size = recon.size(d);
      const int64_t stride = expanded.stride(d);
      if (view.dims > 0 && view.strides[view.dims - 1] == stride * size) {
        view.sizes[view.dims - 1] *= size;
        view.strides[view.dims - 1] = stride;
        continue;
      }
      TORCH_CHECK(view.dims < kMaxWeightDims, "fusedvae: expected weight to vary over at most ",
                  kMaxWeightDims, " dimensions after merging, got more");
      view.sizes[view.dims] = size;
      view.strides[view.dims] = stride;
      ++view.dims;
    }
    if (view.dims == 0) {
      view.dims = 1;
      view.sizes[0] = 1;
      view.strides[0] = 0;
    }
    view.batch_stride = expanded.stride(0);
    view.data = weight.const_data_ptr();
    if (!shared_scale) return;
    // W_b: the weight's own sum within a sample, times how often broadcasting
    // repeats it.
    std::vector<int64_t> padded(static_cast<size_t>(recon_in.dim() - weight.dim()), 1);
    padded.insert(padded.end(), weight.sizes().begin(), weight.sizes().end());
    const Tensor w_padded = weight.reshape(padded);
    std::vector<int64_t> sample_dims;
    double repeats = 1;
    for (int64_t d = 1; d < recon_in.dim(); ++d) {
      sample_dims.push_back(d);
      if (w_padded.size(d) == 1) repeats *= static_cast<double>(recon_in.size(d));
    }
    const Tensor sums =
        sample_dims.empty() ? w_padded.reshape({w_padded.size(0)}) : w_padded.sum(sample_dims);
    weight_sums = sums.mul(repeats).contiguous();
    problem.weight_sums = weight_sums.const_data_ptr();
    problem.weight_sums_stride = weight_sums.size(0) == 1 ? 0 : 1;
  }
};

// An optional upstream gradient as the kernels read it: [batch] (or 0-d for a
// reduced loss), in the accumulation type, on the device, with its stride.
const void* grad_operand(const std::optional<Tensor>& grad, const char* name, int64_t batch,
                         bool per_sample, at::ScalarType acc, const Tensor& ref, Tensor& holder,
                         int64_t& stride) {
  stride = 0;
  if (!grad.has_value() || !grad->defined()) return nullptr;
  check_same_device(*grad, name, ref, "recon");
  if (per_sample) {
    TORCH_CHECK_VALUE(grad->dim() == 1 && grad->size(0) == batch, "fusedvae: expected ", name,
                      " of shape [", batch, "], got ", grad->sizes());
    stride = grad->stride(0);
  } else {
    TORCH_CHECK_VALUE(grad->dim() == 0, "fusedvae: expected ", name,
                      " of shape [] (the loss is reduced), got ", grad->sizes());
  }
  holder = grad->scalar_type() == acc ? *grad : grad->to(acc);
  return holder.const_data_ptr();
}

struct KlInputs {
  Tensor mu, logvar;
  KlProblem problem;
  KlInputs(const Tensor& mu_in, const Tensor& logvar_in) {
    const DType dtype = to_dtype(mu_in, "mu");
    TORCH_CHECK_VALUE(mu_in.dim() >= 1,
                      "fusedvae: expected mu of shape [batch, ...], got a 0-d tensor");
    check_same_shape(logvar_in, "logvar", mu_in, "mu");
    check_same_device(logvar_in, "logvar", mu_in, "mu");
    TORCH_CHECK_TYPE(logvar_in.scalar_type() == mu_in.scalar_type(), "fusedvae: expected logvar ",
                     "of dtype ", mu_in.scalar_type(), " (the dtype of mu), got ",
                     logvar_in.scalar_type());
    mu = mu_in.contiguous();
    logvar = logvar_in.contiguous();
    const int64_t batch = mu.size(0);
    problem = KlProblem{mu.const_data_ptr(), logvar.const_data_ptr(), dtype, batch,
                        batch == 0 ? 0 : mu.numel() / batch};
  }
};

}  // namespace

bool recon_gradient_is_per_sample(c10::string_view likelihood, bool logits,
                                  const std::optional<Tensor>& log_scale) {
  return !math::kLikelihoodTable[parse_likelihood(likelihood, logits)].has_scale ||
         log_scale_is_per_element(log_scale);
}

namespace {

// vae_loss's outputs, allocated in the accumulation type.
struct ObjectiveOutputs {
  Tensor loss, rec, kl, aux;
  ObjectiveOutputs(const ObjectiveInputs& in, const Tensor& recon) {
    const Objective& o = in.problem.objective;
    const auto options = recon.options().dtype(in.acc);
    loss = o.reduction == Reduction::kNone ? at::empty({o.batch}, options) : at::empty({}, options);
    rec = at::empty({o.batch}, options);
    kl = at::empty({o.batch}, options);
    aux = at::empty({AuxLayout{o.batch, o.j}.size()}, options);
  }
};

// vae_loss's outputs and, where `with_grad`, vae_loss_and_grad's gradient of
// the loss for a loss gradient of 1 with respect to recon (else an undefined
// tensor).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_objective(
    const Backend& backend, const Tensor& recon, const Tensor& target, const Tensor& mu,
    const Tensor& logvar, const std::optional<Tensor>& log_scale, const std::optional<Tensor>& beta,
    c10::string_view likelihood, bool logits, c10::string_view reduction, double log_scale_value,
    bool optimal_scale, double beta_value, double free_bits, const std::optional<Tensor>& weight,
    bool with_grad) {
  const c10::OptionalDeviceGuard guard(recon.device());
  ObjectiveInputs in(recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction,
                     log_scale_value, optimal_scale, beta_value, free_bits, weight);
  ObjectiveOutputs out(in, recon);
  void* const outputs[] = {out.loss.data_ptr(), out.rec.data_ptr(), out.kl.data_ptr(),
                           out.aux.data_ptr()};
  if (!with_grad) {
    backend.objective_forward(in.problem, outputs[0], outputs[1], outputs[2], outputs[3]);
    return {out.loss, out.rec, out.kl, out.aux, Tensor()};
  }
  Output grad_recon(recon, in.recon);
  if (!backend.objective_forward_with_grad(in.problem, outputs[0], outputs[1], outputs[2],
                                           outputs[3], grad_recon.work.data_ptr())) {
    backend.objective_forward(in.problem, outputs[0], outputs[1], outputs[2], outputs[3]);
    const Tensor one = at::ones({}, out.rec.options());
    OutputGrads grads{};
    grads.loss = one.const_data_ptr();
    grads.loss_stride = 0;  // every sample's, for reduction "none"
    ObjectiveGrads grads_out{};
    grads_out.recon = grad_recon.work.data_ptr();
    backend.objective_backward(in.problem, grads, out.aux.const_data_ptr(), grads_out);
  }
  return {out.loss, out.rec, out.kl, out.aux, grad_recon.finish()};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> vae_loss(
    const Backend& backend, const Tensor& recon, const Tensor& target, const Tensor& mu,
    const Tensor& logvar, const std::optional<Tensor>& log_scale, const std::optional<Tensor>& beta,
    c10::string_view likelihood, bool logits, c10::string_view reduction, double log_scale_value,
    bool optimal_scale, double beta_value, double free_bits, const std::optional<Tensor>& weight) {
  auto [loss, rec, kl, aux, none] =
      forward_objective(backend, recon, target, mu, logvar, log_scale, beta, likelihood, logits,
                        reduction, log_scale_value, optimal_scale, beta_value, free_bits, weight,
                        /*with_grad=*/false);
  return {loss, rec, kl, aux};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vae_loss_and_grad(
    const Backend& backend, const Tensor& recon, const Tensor& target, const Tensor& mu,
    const Tensor& logvar, const std::optional<Tensor>& log_scale, const std::optional<Tensor>& beta,
    c10::string_view likelihood, bool logits, c10::string_view reduction, double log_scale_value,
    bool optimal_scale, double beta_value, double free_bits, const std::optional<Tensor>& weight) {
  return forward_objective(backend, recon, target, mu, logvar, log_scale, beta, likelihood, logits,
                           reduction, log_scale_value, optimal_scale, beta_value, free_bits, weight,
                           /*with_grad=*/true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vae_loss_backward(
    const Backend& backend, const std::optional<Tensor>& grad_loss,
    const std::optional<Tensor>& grad_rec, const std::optional<Tensor>& grad_kl,
    const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
    const std::optional<Tensor>& log_scale, const std::optional<Tensor>& beta, const Tensor& aux,
    c10::string_view likelihood, bool logits, c10::string_view reduction, double log_scale_value,
    bool optimal_scale, double beta_value, double free_bits, std::array<bool, 4> output_mask,
    const std::optional<Tensor>& weight, bool recon_coefficients) {
  const c10::OptionalDeviceGuard guard(recon.device());
  ObjectiveInputs in(recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction,
                     log_scale_value, optimal_scale, beta_value, free_bits, weight);
  const Objective& o = in.problem.objective;
  check_same_device(aux, "aux", recon, "recon");
  const int64_t aux_size = AuxLayout{o.batch, o.j}.size();
  TORCH_CHECK_VALUE(aux.dim() == 1 && aux.size(0) == aux_size && aux.scalar_type() == in.acc &&
                        aux.is_contiguous(),
                    "fusedvae: expected aux to be the fourth output of vae_loss for these "
                    "arguments: contiguous, of shape [",
                    aux_size, "] and dtype ", in.acc, ", got shape ", aux.sizes(), " and dtype ",
                    aux.scalar_type());

  Tensor loss_holder, rec_holder, kl_holder;
  OutputGrads grads{};
  grads.loss = grad_operand(grad_loss, "grad_loss", o.batch, o.reduction == Reduction::kNone,
                            in.acc, recon, loss_holder, grads.loss_stride);
  grads.rec = grad_operand(grad_rec, "grad_rec", o.batch, true, in.acc, recon, rec_holder,
                           grads.rec_stride);
  grads.kl =
      grad_operand(grad_kl, "grad_kl", o.batch, true, in.acc, recon, kl_holder, grads.kl_stride);

  const auto none = [&] { return at::empty({0}, recon.options()); };
  const bool want_scale = output_mask[2] && log_scale.has_value();
  TORCH_CHECK_VALUE(
      !(recon_coefficients && objective::uses_shared_scale(o)),
      "fusedvae: expected recon_coefficients=False with one log-scale for the whole batch ",
      "(a number, a 0-d log_scale or optimal_scale=True), whose recon gradient is no ",
      "per-sample multiple of vae_loss_and_grad's");
  TORCH_CHECK_VALUE(
      !(recon_coefficients && want_scale && in.per_element_scale),
      "fusedvae: expected output_mask[2] to be False with recon_coefficients=True and "
      "a per-element log_scale, whose gradient comes from recon's gradient");
  const bool want_coef = recon_coefficients && output_mask[0];
  // A per-element log_scale's gradient comes from the same kernel as recon's.
  const bool want_recon =
      !recon_coefficients && (output_mask[0] || (want_scale && in.per_element_scale));
  const bool want_latent = output_mask[1];
  const bool want_beta = output_mask[3] && beta.has_value();
  const auto scalar_options = recon.options().dtype(in.acc);

  ObjectiveGrads out{};
  std::optional<Output> grad_recon, grad_scale_full;
  if (want_recon) {
    grad_recon.emplace(recon, in.recon);
    out.recon = grad_recon->work.data_ptr();
  }
  Tensor recon_coef = want_coef ? at::empty({o.batch}, scalar_options) : none();
  if (want_coef) out.recon_coef = recon_coef.data_ptr();
  Tensor grad_mu = want_latent ? at::empty(mu.sizes(), mu.options()) : none();
  Tensor grad_logvar = want_latent ? at::empty(mu.sizes(), mu.options()) : none();
  if (want_latent) {
    out.mu = grad_mu.data_ptr();
    out.logvar = grad_logvar.data_ptr();
  }
  Tensor grad_scale_scalar;
  if (want_scale) {
    if (in.per_element_scale) {
      // Shaped like the log_scale given where it is full-size, else like
      // recon (reduced to the log_scale's shape below).
      const bool full = log_scale->sizes() == recon.sizes();
      grad_scale_full.emplace(full ? *log_scale : in.log_scale, in.recon);
      out.log_scale = grad_scale_full->work.data_ptr();
    } else {
      grad_scale_scalar = at::empty({}, scalar_options);
      out.log_scale = grad_scale_scalar.data_ptr();
    }
  }
  Tensor grad_beta = want_beta ? at::empty({}, scalar_options) : none();
  if (want_beta) out.beta = grad_beta.data_ptr();

  backend.objective_backward(in.problem, grads, aux.const_data_ptr(), out);

  Tensor result_recon = want_coef ? recon_coef : output_mask[0] ? grad_recon->finish() : none();
  Tensor result_scale = none();
  if (want_scale) {
    const Tensor& s = *log_scale;
    if (in.per_element_scale) {
      result_scale = grad_scale_full->finish();
      if (result_scale.sizes() != s.sizes()) result_scale = result_scale.sum_to_size(s.sizes());
    } else {
      result_scale = grad_scale_scalar;
    }
    if (result_scale.scalar_type() != s.scalar_type() || result_scale.device() != s.device()) {
      result_scale = result_scale.to(s.device(), s.scalar_type());
    }
  }
  if (want_beta &&
      (grad_beta.scalar_type() != beta->scalar_type() || grad_beta.device() != beta->device())) {
    grad_beta = grad_beta.to(beta->device(), beta->scalar_type());
  }
  return {result_recon, grad_mu, grad_logvar, result_scale, grad_beta};
}

Tensor gaussian_kl_per_dim(const Backend& backend, const Tensor& mu, const Tensor& logvar) {
  const c10::OptionalDeviceGuard guard(mu.device());
  KlInputs in(mu, logvar);
  Tensor kl = at::empty(mu.sizes(), mu.options().dtype(accumulate_type(mu.scalar_type())));
  backend.kl_per_dim(in.problem, kl.data_ptr());
  return kl;
}

std::tuple<Tensor, Tensor> gaussian_kl_per_dim_backward(const Backend& backend, const Tensor& grad,
                                                        const Tensor& mu, const Tensor& logvar) {
  const c10::OptionalDeviceGuard guard(mu.device());
  KlInputs in(mu, logvar);
  check_same_device(grad, "grad", mu, "mu");
  check_same_shape(grad, "grad", mu, "mu");
  const Tensor g = grad.to(accumulate_type(mu.scalar_type())).contiguous();
  Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  Tensor grad_logvar = at::empty(mu.sizes(), mu.options());
  backend.kl_backward(in.problem, KlCoefficients{g.const_data_ptr(), nullptr, nullptr},
                      KlGrads{grad_mu.data_ptr(), grad_logvar.data_ptr()});
  return {grad_mu, grad_logvar};
}

// ------------------------------------------------ KL over latent groups ----

namespace {

// One latent group of gaussian_kl: its tensors in the common dtype, contiguous,
// as the kernels read them.
struct KlGroup {
  Tensor mu, logvar, prior_mu, prior_logvar;
  KlProblem problem{};
};

// The groups of gaussian_kl, checked and converted to their common dtype.
struct KlGroups {
  std::vector<KlGroup> groups;
  at::ScalarType dtype = at::kFloat;
  int64_t batch = 0;
  int64_t free_bits_dims = 0;  // Σ J_g over the groups with free bits: dim_mean's size

  KlGroups(at::TensorList mu, at::TensorList logvar, at::TensorList prior_mu,
           at::TensorList prior_logvar, at::ArrayRef<double> free_bits) {
    const size_t count = mu.size();
    TORCH_CHECK_VALUE(count >= 1, "fusedvae: expected mu to hold at least one latent group");
    TORCH_CHECK_VALUE(logvar.size() == count, "fusedvae: expected logvar to hold ", count,
                      " groups (as mu does), got ", logvar.size());
    const bool prior = !prior_mu.empty() || !prior_logvar.empty();
    TORCH_CHECK_VALUE(!prior || (prior_mu.size() == count && prior_logvar.size() == count),
                      "fusedvae: expected prior_mu and prior_logvar to be empty or to hold ", count,
                      " groups (as mu does), got ", prior_mu.size(), " and ", prior_logvar.size());
    TORCH_CHECK_VALUE(free_bits.size() == count, "fusedvae: expected free_bits to hold ", count,
                      " values (one per group), got ", free_bits.size());
    const Tensor& first = mu[0];
    TORCH_CHECK_VALUE(first.dim() >= 1,
                      "fusedvae: expected mu[0] of shape [batch, ...], got a 0-d tensor");
    batch = first.size(0);
    for (size_t g = 0; g < count; ++g) {
      const std::string at_g = "[" + std::to_string(g) + "]";
      const auto name = [&](const char* base) { return std::string(base) + at_g; };
      to_dtype(mu[g], name("mu").c_str());
      to_dtype(logvar[g], name("logvar").c_str());
      TORCH_CHECK_VALUE(mu[g].dim() >= 1 && mu[g].size(0) == batch, "fusedvae: expected mu", at_g,
                        " of shape [", batch, ", ...] (the batch size of mu[0]), got ",
                        mu[g].sizes());
      check_same_shape(logvar[g], name("logvar").c_str(), mu[g], name("mu").c_str());
      check_same_device(mu[g], name("mu").c_str(), first, "mu[0]");
      check_same_device(logvar[g], name("logvar").c_str(), first, "mu[0]");
      TORCH_CHECK_VALUE(std::isfinite(free_bits[g]) && free_bits[g] >= 0,
                        "fusedvae: expected free_bits", at_g, " to be a finite number >= 0, got ",
                        free_bits[g]);
      dtype = at::promote_types(g == 0 ? mu[g].scalar_type() : dtype, mu[g].scalar_type());
      dtype = at::promote_types(dtype, logvar[g].scalar_type());
      if (prior) {
        for (const auto& [t, base] :
             {std::pair<const Tensor&, const char*>{prior_mu[g], "prior_mu"},
              {prior_logvar[g], "prior_logvar"}}) {
          to_dtype(t, name(base).c_str());
          check_same_shape(t, name(base).c_str(), mu[g], name("mu").c_str());
          check_same_device(t, name(base).c_str(), first, "mu[0]");
          dtype = at::promote_types(dtype, t.scalar_type());
        }
      }
      if (free_bits[g] > 0) free_bits_dims += batch == 0 ? 0 : mu[g].numel() / batch;
    }
    const auto working = [&](const Tensor& t) { return t.to(dtype).contiguous(); };
    const DType kernel_dtype = to_dtype(dtype, "mu");
    for (size_t g = 0; g < count; ++g) {
      KlGroup group;
      group.mu = working(mu[g]);
      group.logvar = working(logvar[g]);
      group.problem = KlProblem{group.mu.const_data_ptr(), group.logvar.const_data_ptr(),
                                kernel_dtype, batch, batch == 0 ? 0 : group.mu.numel() / batch};
      if (prior) {
        group.prior_mu = working(prior_mu[g]);
        group.prior_logvar = working(prior_logvar[g]);
        group.problem.prior_mu = group.prior_mu.const_data_ptr();
        group.problem.prior_logvar = group.prior_logvar.const_data_ptr();
      }
      groups.push_back(std::move(group));
    }
  }

  at::TensorOptions acc_options() const {
    return groups[0].mu.options().dtype(accumulate_type(dtype));
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> gaussian_kl(const Backend& backend, at::TensorList mu,
                                               at::TensorList logvar, at::TensorList prior_mu,
                                               at::TensorList prior_logvar,
                                               at::ArrayRef<double> free_bits) {
  const c10::OptionalDeviceGuard guard(mu.empty() ? std::nullopt
                                                  : std::optional<at::Device>(mu[0].device()));
  const KlGroups in(mu, logvar, prior_mu, prior_logvar, free_bits);
  const at::TensorOptions acc = in.acc_options();
  Tensor kl = at::empty({in.batch}, acc);
  Tensor kl_term;  // Σ_g kl_bg, or K_g = Σ_j max(λ_g, m_j) where group g has free bits
  Tensor dim_mean = at::empty({in.free_bits_dims}, acc);
  Tensor group_kl = in.groups.size() > 1 ? at::empty({in.batch}, acc) : kl;
  int64_t offset = 0;
  for (size_t g = 0; g < in.groups.size(); ++g) {
    const KlProblem& p = in.groups[g].problem;
    Tensor out = g == 0 ? kl : group_kl;
    if (free_bits[g] > 0) {
      const Tensor mean = dim_mean.narrow(0, offset, p.latent_dim);
      offset += p.latent_dim;
      backend.kl_sums(p, out.data_ptr(), mean.data_ptr());
      const Tensor floor = mean.clamp_min(free_bits[g]).sum();
      kl_term = kl_term.defined() ? kl_term.add_(floor) : floor.expand({in.batch}).clone();
    } else {
      backend.kl_sums(p, out.data_ptr(), nullptr);
      kl_term = kl_term.defined() ? kl_term.add_(out) : out.clone();
    }
    if (g > 0) kl.add_(group_kl);
  }
  return {kl, kl_term, dim_mean};
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
gaussian_kl_backward(const Backend& backend, const std::optional<Tensor>& grad_kl,
                     const std::optional<Tensor>& grad_kl_term, at::TensorList mu,
                     at::TensorList logvar, at::TensorList prior_mu, at::TensorList prior_logvar,
                     const Tensor& dim_mean, at::ArrayRef<double> free_bits) {
  const c10::OptionalDeviceGuard guard(mu.empty() ? std::nullopt
                                                  : std::optional<at::Device>(mu[0].device()));
  const KlGroups in(mu, logvar, prior_mu, prior_logvar, free_bits);
  const at::TensorOptions acc = in.acc_options();
  TORCH_CHECK_VALUE(dim_mean.dim() == 1 && dim_mean.size(0) == in.free_bits_dims,
                    "fusedvae: expected dim_mean of shape [", in.free_bits_dims,
                    "] (gaussian_kl's third output), got ", dim_mean.sizes());
  const auto per_sample = [&](const std::optional<Tensor>& grad, const char* name) {
    if (!grad.has_value()) return Tensor();
    TORCH_CHECK_VALUE(grad->dim() == 1 && grad->size(0) == in.batch, "fusedvae: expected ", name,
                      " of shape [", in.batch, "], got ", grad->sizes());
    check_same_device(*grad, name, mu[0], "mu[0]");
    return grad->to(acc).contiguous();
  };
  const Tensor g_kl = per_sample(grad_kl, "grad_kl");
  const Tensor g_term = per_sample(grad_kl_term, "grad_kl_term");
  // ∂loss/∂kl_bg: grad_kl_b, plus grad_kl_term_b where the group has no free
  // bits; with free bits, K_g's Σ_b grad_kl_term_b / B on each dimension whose
  // batch mean passes the clamp (m_j >= λ_g, as torch.clamp's gradient).
  Tensor plain =
      g_kl.defined() && g_term.defined() ? g_kl.add(g_term) : (g_kl.defined() ? g_kl : g_term);
  const Tensor term_share =
      g_term.defined() && in.batch > 0 ? g_term.sum().div(double(in.batch)) : Tensor();
  const Tensor dims = dim_mean.to(acc).contiguous();
  std::vector<Tensor> grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar;
  int64_t offset = 0;
  for (size_t g = 0; g < in.groups.size(); ++g) {
    const KlGroup& group = in.groups[g];
    const KlProblem& p = group.problem;
    Tensor coef_sample = plain, coef_dim;
    if (free_bits[g] > 0) {
      coef_sample = g_kl;
      if (term_share.defined()) {
        coef_dim =
            dims.narrow(0, offset, p.latent_dim).ge(free_bits[g]).to(acc.dtype()).mul(term_share);
      }
      offset += p.latent_dim;
    }
    KlGrads out{};
    const auto gradient = [&](const Tensor& like, std::vector<Tensor>& list) {
      list.push_back(at::empty_like(like));
      return list.back().data_ptr();
    };
    out.mu = gradient(group.mu, grad_mu);
    out.logvar = gradient(group.logvar, grad_logvar);
    if (p.has_prior()) {
      out.prior_mu = gradient(group.prior_mu, grad_prior_mu);
      out.prior_logvar = gradient(group.prior_logvar, grad_prior_logvar);
    }
    // A null coefficient counts as 0 (KlCoefficients).
    backend.kl_backward(
        p,
        KlCoefficients{nullptr, coef_sample.defined() ? coef_sample.const_data_ptr() : nullptr,
                       coef_dim.defined() ? coef_dim.const_data_ptr() : nullptr},
        out);
  }
  // Each gradient in its input's dtype and shape.
  const auto restore = [](std::vector<Tensor>& grads, at::TensorList inputs) {
    for (size_t g = 0; g < grads.size(); ++g) {
      grads[g] = grads[g].to(inputs[g].scalar_type());
    }
  };
  restore(grad_mu, mu);
  restore(grad_logvar, logvar);
  restore(grad_prior_mu, prior_mu);
  restore(grad_prior_logvar, prior_logvar);
  return {grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar};
}

Tensor cb_log_normalizer(const Backend& backend, const Tensor& logits) {
  const c10::OptionalDeviceGuard guard(logits.device());
  const DType dtype = to_dtype(logits, "logits");
  const Tensor x = logits.is_non_overlapping_and_dense() ? logits : logits.contiguous();
  Output out(logits, x);
  backend.cb_forward(CbProblem{x.const_data_ptr(), dtype, x.numel()}, out.work.data_ptr());
  return out.finish();
}

Tensor cb_log_normalizer_backward(const Backend& backend, const Tensor& grad,
                                  const Tensor& logits) {
  const c10::OptionalDeviceGuard guard(logits.device());
  const DType dtype = to_dtype(logits, "logits");
  check_same_shape(grad, "grad", logits, "logits");
  check_same_device(grad, "grad", logits, "logits");
  const Tensor x = logits.is_non_overlapping_and_dense() ? logits : logits.contiguous();
  const Tensor g = in_layout_of(grad.to(logits.scalar_type()), x);
  Output out(logits, x);
  backend.cb_backward(CbProblem{x.const_data_ptr(), dtype, x.numel()}, g.const_data_ptr(),
                      out.work.data_ptr());
  return out.finish();
}

// ------------------------------------------------ discretized mixture ------

namespace {

// A [B, X, H, W] tensor as (batch, channel, pixel) strides, the pixel index
// running over H·W: dense NCHW and channels-last tensors have them; any other
// is copied first.
Tensor with_pixel_index(const Tensor& t) {
  const bool collapsible =
      t.size(2) <= 1 || t.size(3) <= 1 || t.stride(2) == t.stride(3) * t.size(3);
  return collapsible ? t : t.contiguous();
}

void pixel_strides(const Tensor& t, int64_t* out) {
  out[0] = t.stride(0);
  out[1] = t.stride(1);
  out[2] = t.size(3) > 1 ? t.stride(3) : t.stride(2);
}

struct DmolInputs {
  Tensor params;
  Tensor target;
  DmolProblem problem{};

  DmolInputs(const Tensor& params_in, const Tensor& target_in, int64_t bits, double log_scale_min) {
    const DType dtype = to_dtype(params_in, "params");
    const at::ScalarType t = target_in.scalar_type();
    TORCH_CHECK_TYPE(t == at::kByte || at::isFloatingType(t),
                     "fusedvae: expected target to be a floating-point or uint8 tensor, got ", t);
    TORCH_CHECK_VALUE(target_in.dim() == 4 && (target_in.size(1) == 3 || target_in.size(1) == 1),
                      "fusedvae: expected target of shape [B, 3, H, W] or [B, 1, H, W], got ",
                      target_in.sizes());
    const int64_t channels = target_in.size(1);
    const int64_t per_k = dmol_params_per_component(channels);
    TORCH_CHECK_VALUE(
        params_in.dim() == 4 && params_in.size(0) == target_in.size(0) &&
            params_in.size(2) == target_in.size(2) && params_in.size(3) == target_in.size(3) &&
            params_in.size(1) > 0 && params_in.size(1) % per_k == 0,
        "fusedvae: expected params of shape [B, ", per_k, "K, H, W] for a target of shape ",
        target_in.sizes(), ", got ", params_in.sizes());
    check_same_device(target_in, "target", params_in, "params");
    TORCH_CHECK_VALUE(bits >= 1 && bits <= 16, "fusedvae: expected bits in [1, 16], got ", bits);
    TORCH_CHECK_VALUE(std::isfinite(log_scale_min),
                      "fusedvae: expected a finite log_scale_min, got ", log_scale_min);
    params = with_pixel_index(params_in);
    const bool wide = params_in.scalar_type() == at::kDouble;
    Tensor target_read = target_in;
    if (t != at::kByte && t != (wide ? at::kDouble : at::kFloat)) {
      target_read = target_in.to(wide ? at::kDouble : at::kFloat);
    }
    target = with_pixel_index(target_read);
    problem.params = params.const_data_ptr();
    problem.dtype = dtype;
    problem.target = target.const_data_ptr();
    problem.target_dtype =
        t == at::kByte ? DType::kUInt8 : (wide ? DType::kFloat64 : DType::kFloat32);
    problem.batch = params.size(0);
    problem.channels = static_cast<int>(channels);
    problem.k = params.size(1) / per_k;
    problem.pixels = params.size(2) * params.size(3);
    pixel_strides(params, problem.param_strides);
    pixel_strides(target, problem.target_strides);
    problem.half_width = 1.0 / static_cast<double>((int64_t(1) << bits) - 1);
    problem.log_scale_min = log_scale_min;
  }

  // The per-sample NLL [B], in the accumulation type.
  Tensor new_nll() const { return at::empty({problem.batch}, accumulate_options()); }
  // The per-pixel NLL [B, H, W], in the accumulation type.
  Tensor new_pixel_nll() const { return at::empty(pixel_nll_sizes(), accumulate_options()); }
  std::array<int64_t, 3> pixel_nll_sizes() const {
    return {problem.batch, params.size(2), params.size(3)};
  }
  at::TensorOptions accumulate_options() const {
    return params.options().dtype(accumulate_type(params.scalar_type()));
  }
  // The gradient in the layout the kernel reads params in (NCHW or
  // channels-last), and its strides for the kernel.
  Tensor new_grad(int64_t (&strides)[3]) const {
    Tensor grad = at::empty_like(params);
    pixel_strides(grad, strides);
    return grad;
  }
};

// The NLL and, where keep_pixels, each pixel's (undefined otherwise).
std::tuple<Tensor, Tensor> dmol_forward(const Backend& backend, const Tensor& params,
                                        const Tensor& target, int64_t bits, double log_scale_min,
                                        bool keep_pixels) {
  const c10::OptionalDeviceGuard guard(params.device());
  DmolInputs in(params, target, bits, log_scale_min);
  Tensor nll = in.new_nll();
  Tensor pixel_nll = keep_pixels ? in.new_pixel_nll() : Tensor();
  backend.dmol_forward(in.problem, nll.data_ptr(), keep_pixels ? pixel_nll.data_ptr() : nullptr);
  return {nll, pixel_nll};
}

}  // namespace

Tensor dmol_nll(const Backend& backend, const Tensor& params, const Tensor& target, int64_t bits,
                double log_scale_min) {
  return std::get<0>(dmol_forward(backend, params, target, bits, log_scale_min, false));
}

std::tuple<Tensor, Tensor> dmol_nll_and_pixel_nll(const Backend& backend, const Tensor& params,
                                                  const Tensor& target, int64_t bits,
                                                  double log_scale_min) {
  return dmol_forward(backend, params, target, bits, log_scale_min, true);
}

std::tuple<Tensor, Tensor> dmol_nll_and_grad(const Backend& backend, const Tensor& params,
                                             const Tensor& target, int64_t bits,
                                             double log_scale_min) {
  const c10::OptionalDeviceGuard guard(params.device());
  DmolInputs in(params, target, bits, log_scale_min);
  Tensor nll = in.new_nll();
  int64_t strides[3];
  Tensor grad_params = in.new_grad(strides);
  backend.dmol_forward_with_grad(in.problem, nll.data_ptr(), grad_params.data_ptr(), strides);
  return {nll, grad_params};
}

Tensor dmol_nll_backward(const Backend& backend, const Tensor& grad, const Tensor& params,
                         const Tensor& target, int64_t bits, double log_scale_min,
                         const std::optional<Tensor>& pixel_nll) {
  const c10::OptionalDeviceGuard guard(params.device());
  DmolInputs in(params, target, bits, log_scale_min);
  check_same_device(grad, "grad", params, "params");
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == in.problem.batch,
                    "fusedvae: expected grad of shape [", in.problem.batch, "], got ",
                    grad.sizes());
  const at::ScalarType acc = accumulate_type(params.scalar_type());
  const Tensor g = grad.to(acc).contiguous();
  Tensor given;
  if (pixel_nll.has_value()) {
    check_same_device(*pixel_nll, "pixel_nll", params, "params");
    const std::array<int64_t, 3> shape = in.pixel_nll_sizes();
    TORCH_CHECK_VALUE(pixel_nll->sizes() == at::IntArrayRef(shape),
                      "fusedvae: expected pixel_nll of shape ", at::IntArrayRef(shape),
                      " (dmol_nll_and_pixel_nll's), got ", pixel_nll->sizes());
    TORCH_CHECK_TYPE(pixel_nll->scalar_type() == acc, "fusedvae: expected pixel_nll of dtype ", acc,
                     " (dmol_nll_and_pixel_nll's), got ", pixel_nll->scalar_type());
    given = pixel_nll->contiguous();
  }
  int64_t strides[3];
  Tensor grad_params = in.new_grad(strides);
  backend.dmol_backward(in.problem, g.const_data_ptr(),
                        given.defined() ? given.const_data_ptr() : nullptr, grad_params.data_ptr(),
                        strides);
  return grad_params;
}

}  // namespace fusedvae
