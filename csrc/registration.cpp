// Op schemas and the Python module that loads them. The kernels for each
// device key are registered next to their backends (cpu/register.cpp,
// cuda/register.cpp), autograd in autograd.cpp; fake kernels and vmap rules
// live in fusedvae/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <iterator>
#include <string>

#include "kernels.h"

namespace {

// `fusedvae._C.likelihoods`: math::kLikelihoodTable as a tuple of
// (name, form, has_scale) rows, form "logits", "probabilities" or "location",
// which the Python checks read.
PyObject* likelihood_rows() {
  const auto& table = fusedvae::math::kLikelihoodTable;
  PyObject* rows = PyTuple_New(static_cast<Py_ssize_t>(table.size()));
  if (rows == nullptr) return nullptr;
  for (size_t i = 0; i < table.size(); ++i) {
    const char* form = table[i].form == fusedvae::math::ReconForm::kLogits ? "logits"
                       : table[i].form == fusedvae::math::ReconForm::kProbabilities
                           ? "probabilities"
                           : "location";
    PyObject* row =
        Py_BuildValue("(ssO)", table[i].name, form, table[i].has_scale ? Py_True : Py_False);
    if (row == nullptr) {
      Py_DECREF(rows);
      return nullptr;
    }
    PyTuple_SET_ITEM(rows, static_cast<Py_ssize_t>(i), row);
  }
  return rows;
}

// The names of cpu::FloatMath for `_cpu_float_math`, in the enum's order.
constexpr const char* kFloatMathNames[] = {"exp_nonpositive",   "log1p_unit", "exp_approx",
                                           "expm1_nonpositive", "log_approx", "tanh_approx",
                                           "expm1_approx",      "sigmoid",    "log_product3"};

// `fusedvae._C._cpu_float_math(name, data) -> bytes`: the float32 approximation
// `name` (kFloatMathNames, cpu::FloatMath) of the CPU kernels in use applied to
// each float32 value of the buffer `data`; for the accuracy tests.
PyObject* cpu_float_math(PyObject*, PyObject* args) {
  const char* name = nullptr;
  Py_buffer data;
  if (!PyArg_ParseTuple(args, "sy*", &name, &data)) return nullptr;
  const std::string which = name;
  int index = 0;
  std::string expected;
  for (const char* known : kFloatMathNames) {
    if (which == known) break;
    expected += (expected.empty() ? "'" : ", '") + std::string(known) + "'";
    ++index;
  }
  if (index == static_cast<int>(std::size(kFloatMathNames))) {
    PyBuffer_Release(&data);
    PyErr_Format(PyExc_ValueError, "expected name to be one of %s, got '%s'", expected.c_str(),
                 name);
    return nullptr;
  }
  const auto f = static_cast<fusedvae::cpu::FloatMath>(index);
  if (data.len % static_cast<Py_ssize_t>(sizeof(float)) != 0) {
    PyBuffer_Release(&data);
    PyErr_SetString(PyExc_ValueError,
                    "expected data to hold float32 values (a multiple of 4 bytes)");
    return nullptr;
  }
  PyObject* out = PyBytes_FromStringAndSize(nullptr, data.len);
  if (out != nullptr) {
    fusedvae::cpu::kernels().float_math(f, static_cast<const float*>(data.buf),
                                        reinterpret_cast<float*>(PyBytes_AS_STRING(out)),
                                        data.len / static_cast<Py_ssize_t>(sizeof(float)));
  }
  PyBuffer_Release(&data);
  return out;
}

// Sets a KernelOptions switch to the truth of `arg`; returns its previous value.
PyObject* exchange_option(std::atomic<bool>& option, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
  return PyBool_FromLong(option.exchange(enabled != 0));
}

// `fusedvae._C._set_cuda_wide_loads(enabled) -> bool`: KernelOptions::cuda_wide_loads.
PyObject* set_cuda_wide_loads(PyObject*, PyObject* arg) {
  return exchange_option(fusedvae::kernel_options().cuda_wide_loads, arg);
}

// `fusedvae._C._set_cuda_mixture_fast_math(enabled) -> bool`:
// KernelOptions::cuda_mixture_fast_math.
PyObject* set_cuda_mixture_fast_math(PyObject*, PyObject* arg) {
  return exchange_option(fusedvae::kernel_options().cuda_mixture_fast_math, arg);
}

// `fusedvae._C._set_cuda_mixture_fast_scale(enabled) -> bool`:
// KernelOptions::cuda_mixture_fast_scale.
PyObject* set_cuda_mixture_fast_scale(PyObject*, PyObject* arg) {
  return exchange_option(fusedvae::kernel_options().cuda_mixture_fast_scale, arg);
}

// `fusedvae._C._set_cuda_fast_exp(enabled) -> bool`: KernelOptions::cuda_fast_exp.
PyObject* set_cuda_fast_exp(PyObject*, PyObject* arg) {
  return exchange_option(fusedvae::kernel_options().cuda_fast_exp, arg);
}

PyMethodDef module_methods[] = {
    {"_set_cuda_wide_loads", set_cuda_wide_loads, METH_O,
     "Switch the CUDA objective's wide-load kernels on or off; returns the previous setting."},
    {"_set_cuda_fast_exp", set_cuda_fast_exp, METH_O,
     "Switch the approximate exponential of the CUDA objective's logits likelihoods (float "
     "accumulation) on or off; returns the previous setting."},
    {"_set_cuda_mixture_fast_math", set_cuda_mixture_fast_math, METH_O,
     "Switch the approximate logarithm and exponential of the CUDA discretized mixture's float32 "
     "kernels on or off; returns the previous setting."},
    {"_set_cuda_mixture_fast_scale", set_cuda_mixture_fast_scale, METH_O,
     "Switch the approximate inverse scales and bin widths of the CUDA discretized mixture's "
     "float32 kernels (with _set_cuda_mixture_fast_math) on or off; returns the previous "
     "setting."},
    {"_cpu_float_math", cpu_float_math, METH_VARARGS,
     "The CPU kernels' float32 approximation `name` applied to the float32 values in `data`."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

fusedvae::KernelOptions& fusedvae::kernel_options() {
  static KernelOptions options;
  return options;
}

// `import fusedvae._C` loads this library, which runs the registrations below,
// and picks the CPU kernels' build; `fusedvae._C.cpu_kernels` names it.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* rows = likelihood_rows();
  if (rows == nullptr || PyModule_AddObject(module, "likelihoods", rows) < 0) {
    Py_XDECREF(rows);
    Py_DECREF(module);
    return nullptr;
  }
  if (!fusedvae::cpu::select_kernels() ||
      PyModule_AddStringConstant(module, "cpu_kernels", fusedvae::cpu::kernels().isa) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(fusedvae, m) {
  // The VAE objective (objective.h): loss, and the per-sample [batch] rec and
  // kl, in float32 (float64 for float64 inputs); aux holds what the backward
  // needs (AuxLayout). likelihood: a name of math::kLikelihoodTable. A
  // scaled likelihood's log-scale is log_scale (0-d, or broadcastable to recon), else
  // log_scale_value, or the batch optimum where optimal_scale; β is beta where
  // given, else beta_value. weight, broadcastable to recon, multiplies each
  // element's term in rec and receives no gradient.
  m.def(
      "vae_loss(Tensor recon, Tensor target, Tensor mu, Tensor logvar, Tensor? log_scale, "
      "Tensor? beta, str likelihood, bool logits, str reduction, float log_scale_value, "
      "bool optimal_scale, float beta_value, float free_bits, Tensor? weight=None) "
      "-> (Tensor loss, Tensor rec, Tensor kl, Tensor aux)");
  // Gradients of recon, mu, logvar, log_scale and beta from the gradients of
  // any subset of (loss, rec, kl); output_mask selects (recon, mu and logvar,
  // log_scale, beta), and an unselected gradient is an empty tensor.
  m.def(
      "vae_loss_backward(Tensor? grad_loss, Tensor? grad_rec, Tensor? grad_kl, Tensor recon, "
      "Tensor target, Tensor mu, Tensor logvar, Tensor? log_scale, Tensor? beta, Tensor aux, "
      "str likelihood, bool logits, str reduction, float log_scale_value, bool optimal_scale, "
      "float beta_value, float free_bits, bool[4] output_mask, Tensor? weight=None, "
      "bool recon_coefficients=False) "
      "-> (Tensor grad_recon, Tensor grad_mu, Tensor grad_logvar, Tensor grad_log_scale, "
      "Tensor grad_beta)");
  // vae_loss's outputs and, in the same pass where the backend can, the
  // gradient of loss for a loss gradient of 1 (ones for reduction "none")
  // with respect to recon (recon's dtype and layout); vae_loss_backward with
  // recon_coefficients=True returns, in place of recon's gradient, the
  // [batch] factors that turn that gradient into recon's (each sample's part
  // times its factor), where the scale is not shared by the batch.
  m.def(
      "vae_loss_and_grad(Tensor recon, Tensor target, Tensor mu, Tensor logvar, Tensor? log_scale, "
      "Tensor? beta, str likelihood, bool logits, str reduction, float log_scale_value, "
      "bool optimal_scale, float beta_value, float free_bits, Tensor? weight=None) "
      "-> (Tensor loss, Tensor rec, Tensor kl, Tensor aux, Tensor grad_recon)");
  // KL(N(mu, exp(logvar)) || N(0, I)) per latent dimension, shaped like mu.
  m.def("gaussian_kl_per_dim(Tensor mu, Tensor logvar) -> Tensor");
  m.def(
      "gaussian_kl_per_dim_backward(Tensor grad, Tensor mu, Tensor logvar) "
      "-> (Tensor grad_mu, Tensor grad_logvar)");
  // KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) over latent
  // groups (each [batch, ...], shapes free; the prior lists empty for N(0, I)):
  // kl [batch] = Σ_g kl_bg; kl_term [batch] = Σ_g kl_bg where free_bits[g] is 0,
  // else Σ_j max(free_bits[g], mean_b kl_bj) over group g's dimensions; dim_mean
  // holds those batch means of the free-bits groups, in group order. The
  // backward takes the gradients of kl and kl_term (either may be absent) and
  // returns one gradient per input tensor, lists as the inputs.
  m.def(
      "gaussian_kl(Tensor[] mu, Tensor[] logvar, Tensor[] prior_mu, Tensor[] prior_logvar, "
      "float[] free_bits) -> (Tensor kl, Tensor kl_term, Tensor dim_mean)");
  m.def(
      "gaussian_kl_backward(Tensor? grad_kl, Tensor? grad_kl_term, Tensor[] mu, Tensor[] logvar, "
      "Tensor[] prior_mu, Tensor[] prior_logvar, Tensor dim_mean, float[] free_bits) "
      "-> (Tensor[] grad_mu, Tensor[] grad_logvar, Tensor[] grad_prior_mu, "
      "Tensor[] grad_prior_logvar)");
  // log C(logits) of the continuous Bernoulli, elementwise.
  m.def("cb_log_normalizer(Tensor logits) -> Tensor");
  m.def("cb_log_normalizer_backward(Tensor grad, Tensor logits) -> Tensor");
  // The discretized mixture of logistics (dmol.h): params [B, 10K or 3K, H, W],
  // target [B, 3 or 1, H, W] (float in [-1, 1], or uint8 pixels); the per-sample
  // negative log-likelihood [B] in the accumulation type, and its backward.
  m.def("dmol_nll(Tensor params, Tensor target, int bits, float log_scale_min) -> Tensor");
  // dmol_nll and dmol_nll_backward's gradient for grad 1 together, in one pass
  // where the backend can (the CPU): what dmol_nll's autograd node runs on the
  // CPU when params requires grad.
  m.def(
      "dmol_nll_and_grad(Tensor params, Tensor target, int bits, float log_scale_min) "
      "-> (Tensor nll, Tensor grad_params)");
  // dmol_nll and each pixel's NLL [B, H, W], which dmol_nll_backward takes
  // (pixel_nll) in place of a first pass over the components: what dmol_nll's
  // autograd node runs on CUDA, where a thread holds no cache of the components.
  m.def(
      "dmol_nll_and_pixel_nll(Tensor params, Tensor target, int bits, float log_scale_min) "
      "-> (Tensor nll, Tensor pixel_nll)");
  m.def(
      "dmol_nll_backward(Tensor grad, Tensor params, Tensor target, int bits, "
      "float log_scale_min, Tensor? pixel_nll=None) -> Tensor");
}
