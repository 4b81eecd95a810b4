#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/ScalarType.h>

#include <vector>

namespace fusedvae {
namespace {

using at::Tensor;

DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
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
                       " to be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

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

math::Likelihood parse_likelihood(c10::string_view likelihood, bool logits) {
  using L = math::Likelihood;
  if (likelihood == "bernoulli") return logits ? L::kBernoulliLogits : L::kBernoulliProbs;
  if (likelihood == "cbernoulli") {
    return logits ? L::kContinuousBernoulliLogits : L::kContinuousBernoulliProbs;
  }
  if (likelihood == "squared_error") return L::kSquaredError;
  if (likelihood == "gaussian") return L::kGaussian;
  TORCH_CHECK_VALUE(false,
                    "fusedvae: expected likelihood to be 'bernoulli', 'cbernoulli', "
                    "'squared_error' or 'gaussian', got '",
                    std::string(likelihood), "'");
}

// Checks the reconstruction arguments and puts them in the working layout.
struct ReconInputs {
  Tensor recon, target, log_scale;
  ReconProblem problem;

  ReconInputs(const Tensor& recon_in, const Tensor& target_in,
              const std::optional<Tensor>& log_scale_in, c10::string_view likelihood, bool logits) {
    const math::Likelihood kind = parse_likelihood(likelihood, logits);
    const DType dtype = to_dtype(recon_in, "recon");
    TORCH_CHECK_VALUE(recon_in.dim() >= 1,
                      "fusedvae: expected recon of shape [batch, ...], got a 0-d tensor");
    check_same_shape(target_in, "target", recon_in, "recon");
    check_same_device(target_in, "target", recon_in, "recon");
    const DType target_dtype = to_target_dtype(target_in, recon_in);
    const bool wants_scale = kind == math::Likelihood::kGaussian;
    TORCH_CHECK_VALUE(wants_scale == log_scale_in.has_value(), "fusedvae: likelihood '",
                      std::string(likelihood), "' ", wants_scale ? "needs" : "takes no",
                      " log_scale tensor");
    recon = working_layout(recon_in);
    target = in_layout_of(target_in, recon);
    if (wants_scale) {
      const Tensor& s = *log_scale_in;
      check_same_shape(s, "log_scale", recon_in, "recon");
      check_same_device(s, "log_scale", recon_in, "recon");
      const at::ScalarType r = recon_in.scalar_type();
      const bool narrow = r == at::kHalf || r == at::kBFloat16;
      TORCH_CHECK_TYPE(s.scalar_type() == r || (narrow && s.scalar_type() == at::kFloat),
                       "fusedvae: expected log_scale of dtype ", r, " (the dtype of recon)",
                       narrow ? " or Float" : "", ", got ", s.scalar_type());
      log_scale = in_layout_of(s, recon);
    }
    const int64_t batch = recon.size(0);
    problem = ReconProblem{recon.const_data_ptr(),
                           target.const_data_ptr(),
                           wants_scale ? log_scale.const_data_ptr() : nullptr,
                           dtype,
                           target_dtype,
                           wants_scale ? to_dtype(log_scale, "log_scale") : dtype,
                           batch,
                           batch == 0 ? 0 : recon.numel() / batch,
                           kind};
  }
};

Tensor per_sample_vector(const Tensor& grad, const char* name, int64_t batch, at::ScalarType acc,
                         const Tensor& ref) {
  check_same_device(grad, name, ref, "the input");
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == batch, "fusedvae: expected ", name,
                    " of shape [", batch, "], got ", grad.sizes());
  return grad.to(acc).contiguous();
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

Tensor recon_loss(const Backend& backend, const Tensor& recon, const Tensor& target,
                  const std::optional<Tensor>& log_scale, c10::string_view likelihood,
                  bool logits) {
  const c10::OptionalDeviceGuard guard(recon.device());
  ReconInputs in(recon, target, log_scale, likelihood, logits);
  Tensor rec =
      at::empty({in.problem.batch}, recon.options().dtype(accumulate_type(recon.scalar_type())));
  backend.recon_forward(in.problem, rec.data_ptr());
  return rec;
}

std::tuple<Tensor, Tensor> recon_loss_backward(const Backend& backend, const Tensor& grad,
                                               const Tensor& recon, const Tensor& target,
                                               const std::optional<Tensor>& log_scale,
                                               c10::string_view likelihood, bool logits) {
  const c10::OptionalDeviceGuard guard(recon.device());
  ReconInputs in(recon, target, log_scale, likelihood, logits);
  const Tensor grad_rec = per_sample_vector(grad, "grad", in.problem.batch,
                                            accumulate_type(recon.scalar_type()), recon);
  Output grad_recon(recon, in.recon);
  if (log_scale.has_value()) {
    Output grad_scale(*log_scale, in.recon);
    backend.recon_backward(in.problem, grad_rec.const_data_ptr(), grad_recon.work.data_ptr(),
                           grad_scale.work.data_ptr());
    return {grad_recon.finish(), grad_scale.finish()};
  }
  backend.recon_backward(in.problem, grad_rec.const_data_ptr(), grad_recon.work.data_ptr(),
                         nullptr);
  // No log_scale, no gradient for it: an empty tensor keeps the schema fixed.
  return {grad_recon.finish(), at::empty({0}, recon.options())};
}

Tensor gaussian_kl(const Backend& backend, const Tensor& mu, const Tensor& logvar, bool per_dim) {
  const c10::OptionalDeviceGuard guard(mu.device());
  KlInputs in(mu, logvar);
  const auto options = mu.options().dtype(accumulate_type(mu.scalar_type()));
  Tensor kl = per_dim ? at::empty(mu.sizes(), options) : at::empty({in.problem.batch}, options);
  backend.kl_forward(in.problem, per_dim, kl.data_ptr());
  return kl;
}

std::tuple<Tensor, Tensor> gaussian_kl_backward(const Backend& backend, const Tensor& grad,
                                                const Tensor& mu, const Tensor& logvar) {
  const c10::OptionalDeviceGuard guard(mu.device());
  KlInputs in(mu, logvar);
  const at::ScalarType acc = accumulate_type(mu.scalar_type());
  check_same_device(grad, "grad", mu, "mu");
  const bool per_dim = grad.sizes() == mu.sizes();
  TORCH_CHECK_VALUE(per_dim || (grad.dim() == 1 && grad.size(0) == in.problem.batch),
                    "fusedvae: expected grad of shape [", in.problem.batch, "] or ", mu.sizes(),
                    ", got ", grad.sizes());
  const Tensor g = grad.to(acc).contiguous();
  Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  Tensor grad_logvar = at::empty(mu.sizes(), mu.options());
  backend.kl_backward(in.problem, per_dim, g.const_data_ptr(), grad_mu.data_ptr(),
                      grad_logvar.data_ptr());
  return {grad_mu, grad_logvar};
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

}  // namespace fusedvae
