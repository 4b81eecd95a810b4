// The AVX-512 build of the CPU kernels (16 floats per register): the module
// fusedvae._cpu_avx512, compiled with CPU_CAPABILITY=AVX512 and torch's
// AVX-512 flags (setup.py).
#include "kernel_module.h"
#include "kernels_impl.h"

FUSEDVAE_KERNEL_MODULE(_cpu_avx512)
