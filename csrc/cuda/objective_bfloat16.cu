// The objective's per-element kernels for a bfloat16 recon (objective_recon.cuh).
#include "objective_recon.cuh"

FUSEDVAE_INSTANTIATE_OBJECTIVE(__nv_bfloat16)
