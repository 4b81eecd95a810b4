// The AVX2 + FMA build of the CPU kernels: the module fusedvae._cpu_avx2,
// compiled with CPU_CAPABILITY=AVX2 and -mavx2 -mfma -mf16c (setup.py).
#include "kernel_module.h"
#include "kernels_impl.h"

FUSEDVAE_KERNEL_MODULE(_cpu_avx2)
