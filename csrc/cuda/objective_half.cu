// The objective's per-element kernels for a half recon (objective_recon.cuh).
#include "objective_recon.cuh"

FUSEDVAE_INSTANTIATE_OBJECTIVE(__half)
