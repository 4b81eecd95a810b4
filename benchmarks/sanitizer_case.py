"""A small CUDA case for compute-sanitizer: every kernel family once, at awkward shapes.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_case.py [DEVICE]

DEVICE is ``cuda`` unless given; ``benchmarks/test_gpu_check_cases.py`` runs it
on the CPU so that every line of it runs wherever the tests do.

Run by ``benchmarks/gpu_check.sh`` under memcheck and racecheck. Each call
runs forward and backward; the shapes have partial last blocks, strided and
unaligned views, 16-bit inputs and batches wider than a block.
"""
import sys

import torch

import fusedvae

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
x = torch.randn(3, 3, 17, 19, device=DEVICE, requires_grad=True)
t = torch.randint(0, 256, (3, 3, 17, 19), device=DEVICE, dtype=torch.uint8)
mu = torch.randn(3, 5, device=DEVICE, requires_grad=True)
for lik in ("bernoulli", "cbernoulli", "gaussian"):
    fusedvae.vae_loss(x, t, mu, mu.detach(), likelihood=lik, free_bits=0.1).loss.backward()
fusedvae.vae_loss(x.half(), t, mu, mu.detach()).loss.backward()
fusedvae.vae_loss(x[:, :, :, 1:], t[:, :, :, 1:], mu, mu.detach()).loss.backward()  # strided, unaligned
# targets and log-scales read in their own dtypes beside a 16-bit recon
xb = x.detach().bfloat16().requires_grad_()
fusedvae.vae_loss(xb, t.float() / 255, mu, mu.detach()).loss.backward()
fusedvae.vae_loss(xb, t > 127, mu, mu.detach(), likelihood="cbernoulli").loss.backward()
s = torch.zeros(3, 3, 17, 19, device=DEVICE, requires_grad=True)
fusedvae.vae_loss(xb, t.half(), mu, mu.detach(), likelihood="gaussian", log_scale=s).loss.backward()
# the objective's [B]-sized stages: every scale form, beta tensors, free bits on a
# spatial 16-bit latent, each output alone, and a batch wider than a block
s0 = torch.zeros((), device=DEVICE, requires_grad=True)
beta = torch.tensor(0.5, device=DEVICE, requires_grad=True)
ml = torch.randn(3, 4, 5, 6, device=DEVICE, dtype=torch.half, requires_grad=True)
for scale in ("optimal", s0, -0.3):
    out = fusedvae.vae_loss(x, t, ml, ml.detach(), likelihood="gaussian", log_scale=scale, beta=beta,
                            free_bits=0.2, reduction="none")
    for o in out:
        o.sum().backward(retain_graph=True)
wide = torch.randn(300, 2, 3, device=DEVICE, requires_grad=True)
mw = torch.randn(300, 700, device=DEVICE, requires_grad=True)
for reduction in ("batchmean", "sum", "mean", "none"):
    fusedvae.vae_loss(wide, torch.rand(300, 2, 3, device=DEVICE), mw, mw.detach(), free_bits=0.1,
                      reduction=reduction, likelihood="gaussian", log_scale="optimal").loss.sum().backward()
# Laplace and per-element weights read through their strides (per channel,
# per pixel, a transposed view), with a shared scale and without
for lik in ("gaussian", "laplace"):
    for w in (torch.rand(1, 3, 1, 1, device=DEVICE), torch.rand(3, 1, 17, 19, device=DEVICE),
              torch.rand(19, 17, device=DEVICE).t()):
        for scale in ("optimal", s):
            fusedvae.vae_loss(x, t, mu, mu.detach(), likelihood=lik, log_scale=scale, weight=w).loss.backward()
# the discretized mixture: RGB and grey, NCHW and channels-last, 16-bit params,
# a partial last block, more components than the CPU caches, and on CUDA each
# number of threads per pixel (4 for K >= 4 at this size, 2 for K = 3, 1 for K = 1)
for channels, k, dtype in ((3, 10, torch.float32), (1, 4, torch.bfloat16), (3, 20, torch.half),
                           (3, 3, torch.float32), (1, 1, torch.float32)):
    per_k = 10 if channels == 3 else 3
    p = torch.randn(2, per_k * k, 17, 19, device=DEVICE, dtype=dtype, requires_grad=True)
    img = torch.randint(0, 256, (2, channels, 17, 19), device=DEVICE, dtype=torch.uint8)
    fusedvae.discretized_mix_logistic_nll(p, img).sum().backward()
    pl = p.detach().to(memory_format=torch.channels_last).requires_grad_()
    fusedvae.discretized_mix_logistic_nll(pl, img.float() / 127.5 - 1).sum().backward()
    # the ops autograd does not run on CUDA: the forward with the gradient,
    # the backward that forms the likelihood itself
    torch.ops.fusedvae.dmol_nll_and_grad(pl.detach(), img, 8, -7.0)
    torch.ops.fusedvae.dmol_nll_backward(torch.ones(2, device=DEVICE), pl.detach(), img, 8, -7.0)
# and with logf and expf instead of the hardware's approximate logarithm and
# exponential (the default), then with the opt-in approximate inverse scales
# and bin widths as well
for switch, value in ((fusedvae._C._set_cuda_mixture_fast_math, False),
                      (fusedvae._C._set_cuda_mixture_fast_scale, True)):
    before = switch(value)
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(2, 100, 17, 19, device=DEVICE, dtype=dtype, requires_grad=True)
        img = torch.randint(0, 256, (2, 3, 17, 19), device=DEVICE, dtype=torch.uint8)
        fusedvae.discretized_mix_logistic_nll(p, img).sum().backward()
    switch(before)
# the KL to learned priors over latent groups, a 16-bit group and free bits on it
groups = [torch.randn(3, 5, device=DEVICE, requires_grad=True),
          torch.randn(3, 2, 4, 4, device=DEVICE, dtype=torch.half, requires_grad=True)]
priors = [g.detach().clone().requires_grad_() for g in groups]
fusedvae.gaussian_kl(groups, [g.detach() for g in groups], priors, priors, free_bits=[0.0, 0.1]).sum().backward()
# the opt-in wide loads (16 pixels per access) beside float32 and bfloat16 recon
fusedvae._C._set_cuda_wide_loads(True)
xa = torch.randn(3, 3, 16, 16, device=DEVICE, requires_grad=True)
ta = torch.randint(0, 256, (3, 3, 16, 16), device=DEVICE, dtype=torch.uint8)
for xr in (xa, xa.detach().bfloat16().requires_grad_()):
    for lik in ("bernoulli", "gaussian"):
        fusedvae.vae_loss(xr, ta, mu, mu.detach(), likelihood=lik).loss.backward()
fusedvae._C._set_cuda_wide_loads(False)
# the opt-in approximate exponential of the logits likelihoods, packs and a tail
fast_exp = fusedvae._C._set_cuda_fast_exp(True)
for shape in ((3, 3, 16, 16), (3, 3, 5, 7)):
    ta = torch.randint(0, 256, shape, device=DEVICE, dtype=torch.uint8)
    xf = torch.randn(shape, device=DEVICE, requires_grad=True)
    for xr in (xf, xf.detach().bfloat16().requires_grad_()):
        for lik in ("bernoulli", "cbernoulli"):
            fusedvae.vae_loss(xr, ta, mu, mu.detach(), likelihood=lik).loss.backward()
fusedvae._C._set_cuda_fast_exp(fast_exp)
if DEVICE == "cuda":
    torch.cuda.synchronize()
print("ok")
