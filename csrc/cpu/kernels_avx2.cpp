// The CPU kernels for AVX2 + FMA (or, off x86, for the portable at::vec
// fallback): setup.py compiles every C++ file with CPU_CAPABILITY=AVX2.
#include "kernels_impl.h"
