"""Shared helpers for the fusedvae test suite: inputs, the variant lists, comparisons, devices.

Every comparison in the suite is against ``fusedvae.reference`` (the pure-PyTorch
definition of "correct"), against PyTorch's own losses, or against a closed-form
value; never the fused path against itself.

Imported as ``from helpers import ...``: pytest puts ``tests/`` (which has no
``__init__.py``) on ``sys.path`` when it collects the test files.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import pytest
import torch
from torch import nn

import fusedvae
from fusedvae import bench, reference

F64 = torch.float64
F32 = torch.float32

# float64 against float64: the fused kernels and the reference evaluate the same
# formulas in a different order (vector lanes, chunk sums, expm1 vs exp - 1, the
# continuous-Bernoulli series/closed-form switch at 0.35 vs 1e-3), so a few ulps
# of each element and of each sum may differ. 1e-10 relative is ~1e6 ulps of
# headroom and still catches any formula or scaling error.
RTOL64, ATOL64 = 1e-10, 1e-12

# The likelihoods that take a log-scale.
SCALED = ("gaussian", "laplace")

# (likelihood, logits, log_scale kind): every distinct reconstruction path.
VARIANTS = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("cbernoulli", True, None),
    ("cbernoulli", False, None),
    ("gaussian", True, None),  # sigma = 1
    ("gaussian", True, "float"),
    ("gaussian", True, "scalar_tensor"),  # 0-d, learnable
    ("gaussian", True, "full_tensor"),  # heteroscedastic, shaped like recon
    ("gaussian", True, "broadcast_tensor"),  # [C, 1, 1]
    ("gaussian", True, "per_sample_tensor"),  # [B, 1, 1, 1]
    ("gaussian", True, "optimal"),
    ("laplace", True, None),  # b = 1
    ("laplace", True, "float"),
    ("laplace", True, "scalar_tensor"),
    ("laplace", True, "full_tensor"),
    ("laplace", True, "broadcast_tensor"),
    ("laplace", True, "optimal"),
]
VARIANT_IDS = [f"{lik}-{'logits' if lg else 'probs'}-{ls}" for lik, lg, ls in VARIANTS]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
HALF_DTYPES = (torch.float16, torch.bfloat16)

# The reconstruction paths of each kernel family, one log_scale of each kind the
# kernels treat differently (none, a float, the sigma-VAE optimum, a full tensor):
# the variants run on every device.
DEVICE_VARIANTS = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("cbernoulli", True, None),
    ("cbernoulli", False, None),
    ("gaussian", True, "float"),
    ("gaussian", True, "optimal"),
    ("gaussian", True, "full_tensor"),
    ("laplace", True, "float"),
    ("laplace", True, "optimal"),
    ("laplace", True, "full_tensor"),
]
DEVICE_VARIANT_IDS = [f"{lik}-{'logits' if lg else 'probs'}-{ls}" for lik, lg, ls in DEVICE_VARIANTS]

# ------------------------------------------------------------------ devices --

# Device-specific tests take the ``device`` fixture (conftest.py), which runs each
# of them once per entry here: the "cpu" instance always runs, the "cuda" instance
# only where a GPU is present (it is marked ``cuda``, so ``pytest -m cuda`` selects
# exactly the GPU instances). A machine with CUDA kernels built but no GPU skips them.
CUDA_SKIP_REASON = "needs a CUDA device (torch.cuda.is_available() is False)"
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)],
    ),
]


def synchronize(device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_host_sync(device):
    """On CUDA, make any host-device synchronisation raise; on the CPU, where the
    host is the device, there is nothing to check."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------- inputs --


class Inputs(NamedTuple):
    recon: torch.Tensor
    target: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


def make_inputs(
    likelihood: str,
    logits: bool = True,
    dtype: torch.dtype = torch.float64,
    latent_shape=(5,),
    batch: int = 3,
    sample_shape=(2, 3, 4),
    target_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    device="cpu",
) -> Inputs:
    """recon/target of shape [batch, *sample_shape], mu/logvar of [batch, *latent_shape].

    Values are drawn in float64 on the CPU and then cast and moved to ``device``,
    so a test may upcast the cast values and hand exactly the same numbers to the
    float64 reference, and every device sees the same numbers.
    Probabilities lie in [0.02, 0.98]; targets in [0, 1] with a few exact 0 and 1
    (Bernoulli data is often binary); uint8 targets are random pixels.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *sample_shape)
    if likelihood in SCALED:
        recon = torch.randn(shape, generator=g, dtype=torch.float64)
    elif logits:
        recon = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        recon = 0.02 + 0.96 * torch.rand(shape, generator=g, dtype=torch.float64)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    binary = torch.rand(shape, generator=g, dtype=torch.float64) < 0.25
    target = torch.where(binary, target.round(), target)
    if likelihood in SCALED:
        target = 2 * target - 1
    mu = torch.randn((batch, *latent_shape), generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn((batch, *latent_shape), generator=g, dtype=torch.float64)
    if target_dtype == torch.uint8:
        target = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        target = target.to(target_dtype or dtype)
    return Inputs(*(a.to(device) for a in (recon.to(dtype), target, mu.to(dtype), logvar.to(dtype))))


def make_log_scale(kind, recon_shape, dtype=torch.float64, seed=1, device="cpu"):
    """A log_scale argument of the given kind; tensors are leaves requiring grad."""
    if kind is None or kind == "optimal":
        return kind
    if kind == "float":
        return -0.3
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar_tensor":
        shape = ()
    elif kind == "full_tensor":
        shape = tuple(recon_shape)
    elif kind == "broadcast_tensor":
        shape = (recon_shape[1], 1, 1)
    elif kind == "per_sample_tensor":
        shape = (recon_shape[0],) + (1,) * (len(recon_shape) - 1)
    else:
        raise AssertionError(kind)
    value = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return value.to(dtype=dtype, device=device).requires_grad_()


def fresh(value):
    """An independent leaf copy of a tensor argument (so fused and reference grads don't mix)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def on_cpu_float64(value):
    """``value`` as the float64 reference takes it: on the CPU, floating tensors in
    float64 (uint8 targets stay uint8), a leaf requiring grad if ``value`` did;
    an ``Inputs`` element-wise; anything else unchanged."""
    if isinstance(value, Inputs):
        return Inputs(*(on_cpu_float64(a) for a in value))
    if isinstance(value, torch.Tensor):
        out = value.detach().cpu()
        if out.dtype.is_floating_point:
            out = out.double()
        return out.requires_grad_(value.requires_grad)
    return value


def on_cpu(value):
    """Tensors detached and moved to the CPU: one, or those of a tuple (a
    ``VAELossOutput`` stays one) or of a dict's values; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, tuple):
        moved = [on_cpu(v) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


def weighted_upstream(out):
    """An upstream gradient other than 1, and different per sample: 1.7 on the loss,
    weights from 0.5 to 2 on rec, their negatives on kl."""
    w = torch.linspace(0.5, 2.0, out.rec.shape[0], dtype=out.rec.dtype, device=out.rec.device)
    return 1.7 * out.loss.sum() + (w * out.rec).sum() - (w * out.kl.to(w.dtype)).sum()


def loss_kw(likelihood, logits, reduction="batchmean", free_bits=0.0, beta=0.7):
    return dict(likelihood=likelihood, logits=logits, reduction=reduction, free_bits=free_bits, beta=beta)


# -------------------------------------------------------------- comparisons --


def run_loss(fn, inputs: Inputs, upstream=None, log_scale=None, grad=True, **kwargs):
    """Call ``fn`` (fused or reference) on fresh leaves and backpropagate.

    ``upstream(out) -> scalar`` picks what is differentiated; by default
    ``out.loss.sum()``. Returns (out, grads) with grads a dict over
    recon/mu/logvar/log_scale (None where there is no gradient).
    """
    recon = inputs.recon.detach().clone().requires_grad_(grad)
    mu = inputs.mu.detach().clone().requires_grad_(grad)
    logvar = inputs.logvar.detach().clone().requires_grad_(grad)
    ls = fresh(log_scale)
    out = fn(recon, inputs.target, mu, logvar, log_scale=ls, **kwargs)
    grads = {}
    if grad:
        scalar = upstream(out) if upstream is not None else out.loss.sum()
        scalar.backward()
        grads = {"recon": recon.grad, "mu": mu.grad, "logvar": logvar.grad}
        if isinstance(ls, torch.Tensor) and ls.requires_grad:
            grads["log_scale"] = ls.grad
    return out, grads


def assert_outputs_close(got, expected, rtol, atol, equal_nan=False, check_dtype=True):
    for name in ("loss", "rec", "kl"):
        torch.testing.assert_close(
            getattr(got, name),
            getattr(expected, name),
            rtol=rtol,
            atol=atol,
            equal_nan=equal_nan,
            check_dtype=check_dtype,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def assert_grads_close(got, expected, rtol, atol, equal_nan=False, check_dtype=True):
    assert got.keys() == expected.keys()
    for name in got:
        if expected[name] is None:  # an input the objective does not depend on
            assert got[name] is None or not got[name].any(), name
            continue
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].shape == expected[name].shape, name
        torch.testing.assert_close(
            got[name],
            expected[name],
            rtol=rtol,
            atol=atol,
            equal_nan=equal_nan,
            check_dtype=check_dtype,
            msg=lambda m, name=name: f"grad {name}: {m}",
        )


def compare_to_reference(inputs, ls_kind, rtol=RTOL64, atol=ATOL64, upstream=None, log_scale=None, **kw):
    """The fused loss and its gradients against the reference on the same float64 inputs."""
    if log_scale is None:
        log_scale = make_log_scale(ls_kind, inputs.recon.shape, dtype=inputs.recon.dtype)
    got, got_g = run_loss(fusedvae.vae_loss, inputs, upstream=upstream, log_scale=log_scale, **kw)
    exp, exp_g = run_loss(reference.vae_loss, inputs, upstream=upstream, log_scale=log_scale, **kw)
    assert got.loss.shape == exp.loss.shape
    assert got.rec.shape == got.kl.shape == (inputs.recon.shape[0],)
    assert_outputs_close(got, exp, rtol=rtol, atol=atol)
    assert_grads_close(got_g, exp_g, rtol=rtol, atol=atol)
    return got, got_g, exp, exp_g


# ------------------------------------------------------------ a tiny model --

TINY_LATENT = 4


class TinyConvVAE(nn.Module):
    """1x8x8 images -> 4-d latent -> 1x8x8 logits (or means)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, 4, 3, 2, 1), nn.SiLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(8 * 2 * 2, 2 * TINY_LATENT),
        )
        self.dec_in = nn.Linear(TINY_LATENT, 8 * 2 * 2)
        self.dec = nn.Sequential(
            nn.SiLU(), nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(4, 1, 4, 2, 1),
        )

    def forward(self, x, eps):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.dec(self.dec_in(z).view(-1, 8, 2, 2)), mu, logvar


def tiny_batch(b, uint8, seed):
    """Images for :class:`TinyConvVAE`: (x in [0, 1], the target: x or its uint8 pixels, noise)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (b, 1, 8, 8), generator=g, dtype=torch.uint8)
    x = pixels.float() / 255
    return x, (pixels if uint8 else x), torch.randn(b, TINY_LATENT, generator=g)


# ------------------------------------------------------------------ memory --


def peak_step_bytes(fn, inputs):
    """Peak bytes of one forward+backward of ``fn`` beyond what existed before it,
    gradients left in ``.grad`` included; after one warm-up step (first-call
    allocations, lazy initialisation)."""
    bench.step(fn, *inputs)
    bench.clear_grads(inputs)
    if inputs[0].device.type == "cpu":
        # torch.profiler's memory events (every supported torch has them)
        return bench.peak_memory_bytes(fn, inputs)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    bench.step(fn, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bench.clear_grads(inputs)
    return peak


# The CUDA kernel switches (csrc/kernels.h, KernelOptions), each with its
# default, set by fusedvae._C._set_cuda_<name>.
CUDA_KERNEL_SWITCHES = {"wide_loads": False, "fast_exp": False, "mixture_fast_math": True,
                        "mixture_fast_scale": False}


@contextlib.contextmanager
def cuda_kernel_switches(**settings: bool):
    """The CUDA kernel switches named in ``settings`` (of :data:`CUDA_KERNEL_SWITCHES`)
    set as given inside the block and the others at their defaults, each restored
    after it. The CPU kernels ignore them."""
    unknown = set(settings) - set(CUDA_KERNEL_SWITCHES)
    assert not unknown, unknown
    setters = {name: getattr(fusedvae._C, f"_set_cuda_{name}") for name in CUDA_KERNEL_SWITCHES}
    previous = {name: setter(settings.get(name, CUDA_KERNEL_SWITCHES[name])) for name, setter in setters.items()}
    try:
        yield
    finally:
        for name, setter in setters.items():
            setter(previous[name])
