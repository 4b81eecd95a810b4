"""The kernels the GPU goals are set for, once each, for Nsight Compute.

    ncu --kernel-name regex:"forward_partials|dmol_backward_kernel|sum_chunks|objective_backward" python benchmarks/profile_case.py [DEVICE]

DEVICE is ``cuda`` unless given; ``benchmarks/test_gpu_check_cases.py`` runs it
on the CPU, at small sizes, so that every line of it runs wherever the tests do.
``benchmarks/gpu_check.sh`` runs it under ncu (its kernel-profile step):

- the discretized mixture at 32x3x32x32 and 4x3x256x256, K = 10: a training
  step's forward (keeping each pixel's NLL) and backward, then the forward
  alone;
- the VAE objective at 32x3x512x512, Z = 512, a uint8 target beside a float32
  and a bfloat16 recon: the forward's reduction and the backward map;
- the larger mixture's step with logf and expf instead of the hardware's
  approximations (the default), then with the opt-in approximate inverse
  scales and bin widths, and the objective with a float32 recon under the
  opt-in approximate exponential.
"""
import sys

import torch

import fusedvae
from fusedvae import bench

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
# (batch, side) of the mixture and the objective's image shape, by device.
SIZES = {
    "cuda": ([(32, 32), (4, 256)], (32, 3, 512, 512)),
    "cpu": ([(2, 8), (1, 16)], (2, 3, 16, 16)),
}[DEVICE]

mixture_sizes, image_shape = SIZES
for batch, side in mixture_sizes:
    params, target = bench.make_dmol_inputs(batch, side, DEVICE)
    leaf = params.detach().requires_grad_()
    fusedvae.discretized_mix_logistic_nll(leaf, target).sum().backward()
    with torch.no_grad():
        fusedvae.discretized_mix_logistic_nll(params, target)
for dtype in (torch.float32, torch.bfloat16):
    recon, target, mu, logvar = bench.make_inputs(image_shape, 512, "uint8")
    recon = recon.detach().to(DEVICE, dtype).requires_grad_()
    mu, logvar = (t.detach().to(DEVICE).requires_grad_() for t in (mu, logvar))
    fusedvae.vae_loss(recon, target.to(DEVICE), mu, logvar).loss.backward()
# Beside the default kernels: the larger mixture's step with logf and expf,
# the float32 objective with the opt-in approximate exponential, then the
# mixture's step with the opt-in approximate inverse scales and bin widths.
fast_exp = fusedvae._C._set_cuda_fast_exp(True)
fast_math = fusedvae._C._set_cuda_mixture_fast_math(False)
image = target.to(DEVICE)
params, pixels = bench.make_dmol_inputs(*mixture_sizes[-1], DEVICE)
fusedvae.discretized_mix_logistic_nll(params.detach().requires_grad_(), pixels).sum().backward()
fusedvae.vae_loss(recon.detach().float().requires_grad_(), image, mu, logvar).loss.backward()
fusedvae._C._set_cuda_mixture_fast_math(fast_math)
fusedvae._C._set_cuda_fast_exp(fast_exp)
fast_scale = fusedvae._C._set_cuda_mixture_fast_scale(True)
fusedvae.discretized_mix_logistic_nll(params.detach().requires_grad_(), pixels).sum().backward()
fusedvae._C._set_cuda_mixture_fast_scale(fast_scale)
if DEVICE == "cuda":
    torch.cuda.synchronize()
print("ok")
