// An instruction set's build of the CPU kernels as a Python extension module
// of its own (fusedvae._cpu_avx2, fusedvae._cpu_avx512). setup.py compiles the
// module with that set's -m flags and lets it export nothing but its PyInit
// function; the module publishes its Kernels table as the capsule `kernels`.
// fusedvae._C imports it only where torch runs that instruction set
// (cpu/kernels.cpp), so none of its code can run on a CPU without it.
#pragma once

#include <Python.h>

#include "../kernels.h"

namespace fusedvae {
namespace cpu {

inline PyObject* kernel_module(PyModuleDef* def, const char* capsule_name, const Kernels* table) {
  PyObject* module = PyModule_Create(def);
  if (module == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<Kernels*>(table), capsule_name, nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, "kernels", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

}  // namespace cpu
}  // namespace fusedvae

// Defines PyInit_<name> for the module fusedvae.<name> holding this
// translation unit's kernel table (kernels_impl.h).
#define FUSEDVAE_KERNEL_MODULE(name)                                                           \
  PyMODINIT_FUNC PyInit_##name(void) {                                                         \
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, "fusedvae." #name, nullptr, -1, nullptr}; \
    return fusedvae::cpu::kernel_module(&def, "fusedvae." #name ".kernels",                    \
                                        &fusedvae::cpu::CPU_CAPABILITY::kKernels);             \
  }
