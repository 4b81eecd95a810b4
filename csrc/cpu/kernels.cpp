// Which build of the CPU kernels runs: the one for the instruction set torch
// itself runs (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
// The baseline build is linked into fusedvae._C; the AVX2 and AVX-512 builds
// are modules of their own (kernel_module.h), imported only here and only
// where the CPU runs them.
#include "../kernels.h"

#include <ATen/Version.h>
#include <Python.h>

#include <cctype>
#include <string>

namespace fusedvae {
namespace cpu {
namespace DEFAULT {
extern const Kernels kKernels;
}

namespace {
const Kernels* active = &DEFAULT::kKernels;

// The table of the kernel module `name` (kernel_module.h), or null with a
// Python exception set.
const Kernels* import_kernels(const std::string& name) {
  PyObject* module = PyImport_ImportModule(name.c_str());
  if (module == nullptr) return nullptr;
  PyObject* capsule = PyObject_GetAttrString(module, "kernels");
  Py_DECREF(module);
  if (capsule == nullptr) return nullptr;
  const void* table = PyCapsule_GetPointer(capsule, (name + ".kernels").c_str());
  Py_DECREF(capsule);
  return static_cast<const Kernels*>(table);
}
}  // namespace

const Kernels& kernels() { return *active; }

bool select_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  // Best first: a CPU that runs one of these runs every later one too.
  static const char* const kBuilds[] = {"AVX512", "AVX2"};
  const std::string capability = at::get_cpu_capability();
  bool runs_here = false;
  for (const char* isa : kBuilds) {
    runs_here = runs_here || capability == isa;
    if (!runs_here) continue;
    std::string name = "fusedvae._cpu_";
    for (const char* c = isa; *c; ++c) name += static_cast<char>(std::tolower(*c));
    if (const Kernels* table = import_kernels(name)) {
      active = table;
      return true;
    }
    // A build that should be there and is not: say so, and fall back.
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    const int failed = PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                                        "fusedvae: could not load the %s CPU kernels (%S: %S); "
                                        "using a slower build",
                                        isa, type ? type : Py_None, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (failed) return false;
  }
#endif
  return true;
}

}  // namespace cpu
}  // namespace fusedvae
