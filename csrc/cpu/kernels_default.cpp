// The baseline build of the CPU kernels (at::vec's portable DEFAULT vectors),
// part of fusedvae._C itself: it runs on every CPU, and wherever no faster
// build applies. setup.py compiles it with CPU_CAPABILITY=DEFAULT and no -m flags.
#include "kernels_impl.h"
