"""Shared helpers for the fusedvae test suite.

Every comparison in the suite is against ``fusedvae.reference`` (the pure-PyTorch
definition of "correct"), against PyTorch's own losses, or against a closed-form
value; never the fused path against itself.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple, Optional

import pytest
import torch

# The extension is built in place (fusedvae/_C*.so), not installed: make the
# repository root importable however pytest is started.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import fusedvae  # noqa: E402
from fusedvae import reference  # noqa: E402

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
]
VARIANT_IDS = [f"{lik}-{'logits' if lg else 'probs'}-{ls}" for lik, lg, ls in VARIANTS]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
HALF_DTYPES = (torch.float16, torch.bfloat16)


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
) -> Inputs:
    """recon/target of shape [batch, *sample_shape], mu/logvar of [batch, *latent_shape].

    Values are drawn in float64 and then cast, so a test may upcast the cast
    values and hand exactly the same numbers to the float64 reference.
    Probabilities lie in [0.02, 0.98]; targets in [0, 1] with a few exact 0 and 1
    (Bernoulli data is often binary); uint8 targets are random pixels.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *sample_shape)
    if likelihood == "gaussian":
        recon = torch.randn(shape, generator=g, dtype=torch.float64)
    elif logits:
        recon = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        recon = 0.02 + 0.96 * torch.rand(shape, generator=g, dtype=torch.float64)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    binary = torch.rand(shape, generator=g, dtype=torch.float64) < 0.25
    target = torch.where(binary, target.round(), target)
    if likelihood == "gaussian":
        target = 2 * target - 1
    mu = torch.randn((batch, *latent_shape), generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn((batch, *latent_shape), generator=g, dtype=torch.float64)
    if target_dtype == torch.uint8:
        target = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        target = target.to(target_dtype or dtype)
    return Inputs(recon.to(dtype), target, mu.to(dtype), logvar.to(dtype))


def make_log_scale(kind, recon_shape, dtype=torch.float64, seed=1):
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
    return value.to(dtype).requires_grad_()


def fresh(value):
    """An independent leaf copy of a tensor argument (so fused and reference grads don't mix)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fused():
    return fusedvae.vae_loss


@pytest.fixture(scope="session")
def ref():
    return reference.vae_loss
