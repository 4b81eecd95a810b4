"""What one call of the fused loss costs the host and the device, counted.

- One registered op each way: a forward+backward of ``fusedvae.vae_loss`` runs
  ``fusedvae::vae_loss`` (on the CPU, where it computes recon's gradient in the
  same pass, ``fusedvae::vae_loss_and_grad``: tests/test_one_pass.py) once and
  ``fusedvae::vae_loss_backward`` once, and inside them no ATen operator but
  allocations (counted with torch.profiler on every device, the CPU always).
- The launch budget on CUDA: at most 3 kernels forward and 2 backward for every
  likelihood, reduction and scale form (a per-element log_scale shaped like
  ``recon``), counting only what the ops launch: the backward runs through
  ``torch.autograd.grad`` with explicit output gradients, so autograd seeds
  nothing and accumulates nothing.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fusedvae
from helpers import loss_kw, make_inputs, make_log_scale

# Allocations are the only ATen work the ops may do around their kernels.
ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like"}
FORWARD_LAUNCHES, BACKWARD_LAUNCHES = 3, 2

CASES = [
    ("bernoulli", True, None, "batchmean", 0.0),
    ("bernoulli", False, None, "sum", 0.5),
    ("cbernoulli", True, None, "mean", 0.0),
    ("cbernoulli", False, None, "none", 0.2),
    ("gaussian", True, None, "batchmean", 0.0),
    ("gaussian", True, "float", "none", 0.0),
    ("gaussian", True, "optimal", "mean", 0.3),
    ("gaussian", True, "scalar_tensor", "sum", 0.0),
    ("gaussian", True, "full_tensor", "batchmean", 0.1),
    ("laplace", True, "optimal", "batchmean", 0.0),
    ("laplace", True, "full_tensor", "none", 0.2),
]
IDS = [f"{c[0]}-{'logits' if c[1] else 'probs'}-{c[2]}-{c[3]}-fb{c[4]}" for c in CASES]


def _call(device, likelihood, logits, ls_kind, reduction, free_bits):
    inp = make_inputs(likelihood, logits, torch.float32, (8,), batch=4, sample_shape=(3, 8, 8), device=device)
    leaves = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=torch.float32, device=device)
    if isinstance(ls, torch.Tensor):
        ls = ls.detach().clone().requires_grad_()
        leaves.append(ls)
    beta = torch.tensor(0.7, device=device, requires_grad=True)
    leaves.append(beta)

    def forward():
        return fusedvae.vae_loss(
            leaves[0], inp.target, leaves[1], leaves[2], log_scale=ls,
            **loss_kw(likelihood, logits, reduction, free_bits, beta=beta),
        )

    return forward, leaves


def _nested_ops(prof, name):
    """The ATen/fusedvae operators inside each event called ``name``."""
    calls = [e for e in prof.events() if e.name == name]
    nested = []

    def walk(event):
        for child in event.cpu_children:
            nested.append(child.name)
            walk(child)

    for call in calls:
        walk(call)
    return calls, nested


def _kernels(prof):
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _forward_op(device, likelihood):
    # The one-pass forward: on the CPU, float32 recon, no shared log-scale (the
    # cases' log_scale tensors require grad, which also takes two passes).
    one_pass = device == "cpu" and likelihood in ("bernoulli", "cbernoulli")
    return "fusedvae::vae_loss_and_grad" if one_pass else "fusedvae::vae_loss"


@pytest.mark.parametrize("likelihood,logits,ls_kind,reduction,free_bits", CASES, ids=IDS)
def test_one_op_each_way_and_only_allocations_inside(device, likelihood, logits, ls_kind, reduction, free_bits):
    forward, leaves = _call(device, likelihood, logits, ls_kind, reduction, free_bits)
    forward()  # warm-up: lazy initialisation stays out of the count
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        out = forward()
        torch.autograd.grad(out, leaves, (torch.ones_like(out.loss), torch.ones_like(out.rec), torch.ones_like(out.kl)))
    fwd_calls, fwd_nested = _nested_ops(prof, _forward_op(device, likelihood))
    bwd_calls, bwd_nested = _nested_ops(prof, "fusedvae::vae_loss_backward")
    assert len(fwd_calls) == 1 and len(bwd_calls) == 1
    for nested in (fwd_nested, bwd_nested):
        # Operators only ("namespace::name"): on CUDA the profiler also records the
        # runtime's calls (cudaLaunchKernel) and its own bookkeeping as CPU events.
        others = [n for n in nested if "::" in n and n not in ALLOCATIONS and not n.startswith("fusedvae::")]
        assert others == [], others
    # The whole step: nothing but the two ops and their allocations (the
    # gradients' ones_like above are the test's own; after the one-pass forward
    # the autograd node's in-place product is inside the node's event).
    top = [e.name for e in prof.events() if e.cpu_parent is None and e.device_type != torch.autograd.DeviceType.CUDA]
    assert [n for n in top if n.startswith("aten::") and n not in ALLOCATIONS | {"aten::ones_like"}] == []


@pytest.mark.parametrize("likelihood,logits,ls_kind,reduction,free_bits", CASES, ids=IDS)
def test_launch_budget(device, likelihood, logits, ls_kind, reduction, free_bits):
    forward, leaves = _call(device, likelihood, logits, ls_kind, reduction, free_bits)
    out = forward()
    grads = (torch.ones_like(out.loss), torch.ones_like(out.rec), torch.ones_like(out.kl))
    torch.autograd.grad(out, leaves, grads, retain_graph=True)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as fwd_prof:
        out = forward()
    with profile(activities=activities) as bwd_prof:
        torch.autograd.grad(out, leaves, grads)
    fwd, bwd = _kernels(fwd_prof), _kernels(bwd_prof)
    if device == "cuda":
        assert 1 <= len(fwd) <= FORWARD_LAUNCHES, [k.name for k in fwd]
        assert 1 <= len(bwd) <= BACKWARD_LAUNCHES, [k.name for k in bwd]
    else:
        assert fwd == [] and bwd == []


def test_the_count_sees_an_extra_operator():
    # Control: the nested-op walk finds ATen work where there is some (a
    # broadcast log_scale is copied to recon's shape before the kernels run).
    inp = make_inputs("gaussian", True, torch.float32, (4,), batch=2, sample_shape=(3, 4, 4))
    ls = torch.zeros(1, 3, 1, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood="gaussian", log_scale=ls)
    _, nested = _nested_ops(prof, "fusedvae::vae_loss")
    assert any(n not in ALLOCATIONS for n in nested), nested
