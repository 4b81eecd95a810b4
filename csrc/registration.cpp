// Op schemas and the Python module that loads them. The kernels for each
// device key are registered next to their backends (cpu/register.cpp,
// cuda/register.cpp); fake kernels and autograd live in fusedvae/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"

// `import fusedvae._C` loads this library, which runs the registrations below,
// and picks the CPU kernels' build; `fusedvae._C.cpu_kernels` names it.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (!fusedvae::cpu::select_kernels() ||
      PyModule_AddStringConstant(module, "cpu_kernels", fusedvae::cpu::kernels().isa) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(fusedvae, m) {
  // Per-sample sums Σ_i ℓ(recon_bi, target_bi), shape [batch], in float32
  // (float64 for float64 recon). likelihood: bernoulli | cbernoulli |
  // squared_error | gaussian (the last takes a log_scale shaped like recon).
  m.def(
      "recon_loss(Tensor recon, Tensor target, Tensor? log_scale, str likelihood, "
      "bool logits) -> Tensor");
  // (grad_recon, grad_log_scale); grad_log_scale is empty without log_scale.
  m.def(
      "recon_loss_backward(Tensor grad, Tensor recon, Tensor target, Tensor? log_scale, "
      "str likelihood, bool logits) -> (Tensor, Tensor)");
  // KL(N(mu, exp(logvar)) || N(0, I)) per sample, shape [batch].
  m.def("gaussian_kl(Tensor mu, Tensor logvar) -> Tensor");
  // The same per latent dimension, shaped like mu.
  m.def("gaussian_kl_per_dim(Tensor mu, Tensor logvar) -> Tensor");
  // grad is [batch] (from gaussian_kl) or shaped like mu (from gaussian_kl_per_dim).
  m.def("gaussian_kl_backward(Tensor grad, Tensor mu, Tensor logvar) -> (Tensor, Tensor)");
  // log C(logits) of the continuous Bernoulli, elementwise.
  m.def("cb_log_normalizer(Tensor logits) -> Tensor");
  m.def("cb_log_normalizer_backward(Tensor grad, Tensor logits) -> Tensor");
}
