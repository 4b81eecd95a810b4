"""CPU benchmark: the fused VAE loss against eager PyTorch and torch.compile.

What is measured, per case (a data shape ``[B, C, H, W]``, a latent size ``Z``
and a target dtype): one training step of the loss alone, forward and
``loss.backward()``, with ``recon``, ``mu`` and ``logvar`` requiring grad and
their ``.grad`` set to ``None`` before each step (outside the timed region).
The objective is the Bernoulli-logits negative ELBO with the closed-form KL,
``mean_b(rec_b + beta * kl_b)``, computed three ways on the same tensors:

- ``eager``: what a user writes in eager PyTorch (:func:`eager_loss`);
- ``compiled``: the same function under ``torch.compile`` (inductor, default
  mode, shapes specialised as in a fixed-shape training loop);
- ``fused``: ``fusedvae.vae_loss(...).loss``.

Beside them, as a yardstick, the time torch's own vectorised ``exp`` and
``log1p`` take over as many float32 elements as ``recon`` has
(:func:`exp_log1p_reference`): the transcendental work a softplus costs per
element, written to preallocated outputs, with nothing else around it.

The three methods and the yardstick are interleaved across repeats (the order
rotates every repeat) so that drift in machine load hits all of them alike;
the reported time is the median over repeats.

Accuracy: before timing, each method's loss and gradients are compared with a
float64 truth, ``fusedvae.reference.vae_loss`` on float64 CPU copies of the
same inputs (:func:`truth`), each within the tolerance of the precision that
method computes in (:func:`tolerance`, :func:`compute_dtype`); never the
methods against each other only. The relative errors are reported, and a
method outside its tolerance makes the run fail (:func:`accuracy`). The
methods and the accuracy functions work on any device;
``benchmarks/gpu_bench.py`` uses them on a GPU.

Peak memory: one extra forward+backward per method runs under
``torch.profiler`` with ``profile_memory=True``; the CPU allocator reports
every allocation and free to it, and the peak of the running sum, in time
order, is the most memory the step held at once beyond what existed before it
(the inputs). It includes the gradients left in ``.grad`` at the end (a
``recon.grad`` as large as ``recon`` is unavoidable). It counts only memory
that goes through PyTorch's CPU allocator (tensors, including those the
extension and inductor's generated code allocate), not the stacks or scratch
that kernels allocate by other means.

Run ``python -m fusedvae bench [--quick] [--repeats N]``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedvae
from fusedvae import reference
from fusedvae._checks import accumulate_dtype

__all__ = [
    "DEFAULT_CASES",
    "DMOL_CASES",
    "DMOL_METHODS",
    "QUICK_DMOL_CASES",
    "QUICK_CASES",
    "METHODS",
    "REFERENCE",
    "accuracy",
    "add_arguments",
    "case_name",
    "check_against_truth",
    "clear_grads",
    "compiled_loss",
    "compute_dtype",
    "eager_loss",
    "exp_log1p_reference",
    "format_accuracy",
    "format_results",
    "format_dmol_results",
    "fused_loss",
    "machine_info",
    "main",
    "make_dmol_inputs",
    "make_inputs",
    "peak_memory_bytes",
    "run_case",
    "run_dmol_case",
    "step",
    "tolerance",
    "truth",
]

# (shape, latent_dim, target_dtype)
Case = Tuple[Tuple[int, ...], int, str]

DEFAULT_CASES: List[Case] = [
    ((64, 3, 64, 64), 128, "float32"),
    ((64, 3, 64, 64), 128, "uint8"),
    ((16, 3, 256, 256), 512, "float32"),
    ((16, 3, 256, 256), 512, "uint8"),
]
QUICK_CASES: List[Case] = [
    ((8, 3, 32, 32), 32, "float32"),
    ((8, 3, 32, 32), 32, "uint8"),
]
DEFAULT_REPEATS = 30
QUICK_REPEATS = 10
DEFAULT_WARMUP = 3
TARGET_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


# ------------------------------------------------------------------ methods --


def eager_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0) -> Tensor:
    """The objective as a user writes it in eager PyTorch (Bernoulli logits + closed-form KL).

    A uint8 target is converted to ``recon``'s dtype and divided by 255 there,
    so a bfloat16 ``recon`` is computed in bfloat16 up to the per-sample sums,
    as user code would; those sums are added in float32.
    """
    if target.dtype == torch.uint8:
        target = target.to(recon.dtype) / 255
    rec = F.binary_cross_entropy_with_logits(recon, target, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return (rec.float() + beta * kl.float()).mean()


_COMPILED: Optional[Callable[..., Tensor]] = None


def _get_compiled() -> Callable[..., Tensor]:
    # Created once per process; torch.compile then specialises (and caches) one
    # graph per shape and target dtype. dynamic=False: a training loop sees one
    # shape, so this is the code a user gets; the default automatic-dynamic
    # behaviour would instead recompile every case after the first with
    # symbolic shapes, which is not what a fixed-shape user runs.
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(eager_loss, dynamic=False)
    return _COMPILED


def compiled_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0) -> Tensor:
    """:func:`eager_loss` under ``torch.compile`` (inductor), compiled lazily, once per shape/dtype."""
    return _get_compiled()(recon, target, mu, logvar, beta)


def fused_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0) -> Tensor:
    """``fusedvae.vae_loss(...).loss`` (Bernoulli logits, batchmean)."""
    return fusedvae.vae_loss(recon, target, mu, logvar, beta=beta).loss


METHODS: Dict[str, Callable[..., Tensor]] = {
    "eager": eager_loss,
    "compiled": compiled_loss,
    "fused": fused_loss,
}


# The name of the exp+log1p yardstick in the timings (``ms``, ``times_ms``).
REFERENCE = "exp+log1p"


def exp_log1p_reference(numel: int, seed: int = 0) -> Tuple[Callable[[], None], Dict[str, Tensor]]:
    """``torch.exp`` then ``torch.log1p`` over ``numel`` float32 elements, into preallocated outputs.

    The per-element transcendental work of the loss, done by torch's own
    vectorised kernels: the softplus in the loss evaluates ``exp(-|x|)``
    (arguments <= 0) and ``log1p`` of a value in (0, 1], so the inputs are
    drawn from those ranges (``x = -|N(0, 4)|``, ``u`` uniform in (0, 1]);
    other ranges may take other paths in the vector math.

    Returns ``(run, buffers)``: ``run()`` computes ``torch.exp(x, out=exp_out)``
    followed by ``torch.log1p(u, out=log1p_out)`` and allocates nothing;
    ``buffers`` holds ``x``, ``exp_out``, ``u`` and ``log1p_out`` (each of
    ``numel`` elements), so a caller can check what ran.
    """
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    g = torch.Generator().manual_seed(seed)
    x = -(2.0 * torch.randn(numel, generator=g)).abs()
    u = 1.0 - torch.rand(numel, generator=g)  # rand is in [0, 1): this is in (0, 1]
    exp_out = torch.empty_like(x)
    log1p_out = torch.empty_like(u)

    def run() -> None:
        torch.exp(x, out=exp_out)
        torch.log1p(u, out=log1p_out)

    return run, {"x": x, "exp_out": exp_out, "u": u, "log1p_out": log1p_out}


# --------------------------------------------------------------- utilities --


def case_name(shape: Sequence[int], latent_dim: int, target_dtype: str) -> str:
    """``B64x3x64x64-Z128-uint8``: usable as a pytest id and a table row."""
    b, *rest = shape
    return f"B{b}x" + "x".join(str(s) for s in rest) + f"-Z{latent_dim}-{target_dtype}"


def make_inputs(
    shape: Sequence[int], latent_dim: int, target_dtype: str = "float32", seed: int = 0
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decoder logits, a target in [0, 1] (or uint8 pixels), mu and logvar ``[B, Z]``.

    ``recon``, ``mu`` and ``logvar`` require grad; ``target`` does not.
    """
    if target_dtype not in TARGET_DTYPES:
        raise ValueError(f"target_dtype must be one of {sorted(TARGET_DTYPES)}, got {target_dtype!r}")
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in shape)
    batch = shape[0]
    recon = (2.0 * torch.randn(shape, generator=g)).requires_grad_()
    if target_dtype == "uint8":
        target = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        target = torch.rand(shape, generator=g)
    mu = torch.randn(batch, latent_dim, generator=g).requires_grad_()
    logvar = (0.5 * torch.randn(batch, latent_dim, generator=g)).requires_grad_()
    return recon, target, mu, logvar


def clear_grads(inputs: Sequence[Tensor]) -> None:
    """Set ``.grad = None`` on every input that requires grad."""
    for t in inputs:
        if t.requires_grad:
            t.grad = None


def step(fn: Callable[..., Tensor], recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor,
         beta: float = 1.0) -> Tensor:
    """One forward+backward of ``fn``; returns the (detached) loss."""
    loss = fn(recon, target, mu, logvar, beta)
    loss.backward()
    return loss.detach()


# ------------------------------------------------------------- accuracy --

# Relative tolerance against the float64 truth, by the precision a result is
# computed or stored in. The loss is a sum of non-negative terms (softplus
# terms, KL terms), so its relative error is at most the worst per-element
# relative error plus the error of the summation. The gradients are compared
# as max |g - g_truth| / max |g_truth| (normwise), since a single element
# sigma(x) - t may cancel to nearly 0. Both are checked because a mistake can
# hide in the loss: a uint8 target read as value/256 moves the loss of the
# [16, 3, 256, 256] case by only 3e-6 (its t·x terms average out over random
# logits), but the gradient of recon by 4e-3.
_TOLERANCE = {
    # unit roundoff 1.1e-16: per-element errors of a few ulps and summation
    # over up to ~1e8 elements stay many orders below this.
    torch.float64: 1e-10,
    # unit roundoff u = 6e-8, and the result is itself rounded to float32 (u).
    # exp/log1p and the target scaling cost a few ulps per element; the sums
    # (pairwise in PyTorch, float32 lanes or blocks of a few thousand terms
    # added in double in the fused kernels) add errors growing like sqrt(n)·u
    # for the n terms one float32 accumulator takes: ~1e-6 at most here.
    # Measured on the CPU: at most 2e-7 for every case of both benchmarks.
    torch.float32: 1e-5,
    # unit roundoff u = 2^-8 (0.39 %). Computing in bfloat16, as eager PyTorch
    # does for a bfloat16 recon, rounds the scaled target t/255, each
    # element's loss and each per-sample sum rec_b to bfloat16; samples of
    # similar size round rec_b the same way, so these errors do not average
    # out over the batch (0.15 % for eager on an H200). 4u = 1.6 % covers the
    # few roundings in sequence. A gradient stored in bfloat16 is rounded once
    # (u) per element.
    torch.bfloat16: 4 * 2.0**-8,
    # unit roundoff u = 2^-11, the same reasoning as bfloat16: 4u = 0.2 %.
    # (float16 overflows at 65504: a per-sample sum above it is inf, a failure.)
    torch.float16: 4 * 2.0**-11,
}


_TINY = torch.finfo(torch.float64).tiny  # a floor for the denominators of relative errors


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance against the float64 truth for results computed (or stored) in ``dtype``."""
    if dtype not in _TOLERANCE:
        raise ValueError(f"no tolerance for {dtype}; expected one of {sorted(map(str, _TOLERANCE))}")
    return _TOLERANCE[dtype]


def compute_dtype(method: str, recon_dtype: torch.dtype) -> torch.dtype:
    """The precision ``method`` computes the loss in, for a ``recon`` of ``recon_dtype``.

    ``eager`` (and ``compiled``, which keeps eager's dtypes for what it
    stores) computes the reconstruction term in ``recon``'s dtype; ``fused``
    reads any input dtype exactly and accumulates in float32 (float64 for
    float64 inputs).
    """
    if method == "fused":
        return accumulate_dtype(recon_dtype)
    return recon_dtype


def truth(inputs: Sequence[Tensor], beta: float = 1.0) -> Tuple[Tensor, List[Tensor]]:
    """The loss and its gradients w.r.t. ``recon``, ``mu``, ``logvar`` in float64, on the CPU.

    ``fusedvae.reference.vae_loss`` (Bernoulli logits, ``batchmean``) on float64
    copies of the same inputs: every float16/bfloat16/float32 value is exact
    in float64, and a uint8 target is handed over as uint8, which the
    reference reads as ``target.double() / 255`` (each pixel exact, the
    quotient correctly rounded in float64).
    """
    recon, target, mu, logvar = inputs
    leaves = [v.detach().to(device="cpu", dtype=torch.float64).requires_grad_() for v in (recon, mu, logvar)]
    t = target.detach().to("cpu")
    if t.dtype != torch.uint8:
        t = t.to(torch.float64)
    loss = reference.vae_loss(leaves[0], t, leaves[1], leaves[2], beta=beta).loss
    loss.backward()
    return loss.detach(), [v.grad for v in leaves]


def _evaluate(fn: Callable[..., Tensor], inputs: Sequence[Tensor], beta: float) -> Tuple[Tensor, List[Tensor]]:
    """One forward+backward of ``fn``: the loss and the gradients of recon, mu, logvar (on the CPU)."""
    recon, target, mu, logvar = inputs
    clear_grads(inputs)
    loss = step(fn, recon, target, mu, logvar, beta)
    grads = [v.grad.detach().to("cpu") for v in (recon, mu, logvar)]
    clear_grads(inputs)
    return loss.to("cpu"), grads


def accuracy(
    inputs: Sequence[Tensor], beta: float = 1.0,
    methods: Optional[Dict[str, Callable[..., Tensor]]] = None,
    expected: Optional[Tuple[Tensor, List[Tensor]]] = None,
) -> Dict[str, Dict[str, object]]:
    """Each method's relative error against the float64 truth, and whether it is within tolerance.

    Per method: ``loss`` (its value), ``loss_err`` (``|loss - truth| / |truth|``),
    ``grad_err`` (the largest over recon, mu and logvar of
    ``max |g - g_truth| / max |g_truth|``), ``loss_tol`` (:func:`tolerance` of
    :func:`compute_dtype`), ``grad_tol`` (the looser of that and the
    tolerance of the gradient's own dtype, which it is rounded to), ``ok`` and
    ``problems`` (what failed, in words). ``expected`` is :func:`truth`'s
    result if already computed. Works on any device. Leaves the grads of
    ``inputs`` cleared.
    """
    methods = METHODS if methods is None else methods
    recon = inputs[0]
    t_loss, t_grads = truth(inputs, beta) if expected is None else expected
    report: Dict[str, Dict[str, object]] = {}
    for name, fn in methods.items():
        loss, grads = _evaluate(fn, inputs, beta)
        loss_tol = tolerance(compute_dtype(name, recon.dtype))
        problems = []
        loss64 = loss.double()
        loss_err = float((loss64 - t_loss).abs() / t_loss.abs().clamp_min(_TINY))
        if not torch.isfinite(loss64):
            problems.append(f"loss is {float(loss64)}")
        elif not loss_err <= loss_tol:
            problems.append(f"loss {float(loss64):.9g} vs float64 {float(t_loss):.9g}: "
                            f"relative error {loss_err:.2e} > {loss_tol:.2g}")
        grad_errs, grad_tol = [], loss_tol
        for label, g, g_true in zip(("recon", "mu", "logvar"), grads, t_grads):
            tol = max(loss_tol, tolerance(g.dtype))
            err = float((g.double() - g_true).abs().max() / g_true.abs().max().clamp_min(_TINY))
            if not err <= tol:  # also catches NaN
                problems.append(f"grad of {label}: relative error {err:.2e} > {tol:.2g}")
            grad_errs.append(err)
            grad_tol = max(grad_tol, tol)
        grad_err = math.nan if any(math.isnan(e) for e in grad_errs) else max(grad_errs)
        report[name] = {
            "loss": float(loss64), "loss_err": loss_err, "grad_err": grad_err,
            "loss_tol": loss_tol, "grad_tol": grad_tol, "ok": not problems, "problems": problems,
        }
    return report


def check_against_truth(
    inputs: Sequence[Tensor], beta: float = 1.0,
    methods: Optional[Dict[str, Callable[..., Tensor]]] = None,
) -> Dict[str, Dict[str, object]]:
    """:func:`accuracy`, raising ``AssertionError`` if any method is outside its tolerance."""
    report = accuracy(inputs, beta, methods)
    failed = [f"{name}: " + "; ".join(r["problems"]) for name, r in report.items() if not r["ok"]]
    if failed:
        raise AssertionError("not within tolerance of the float64 reference: " + " | ".join(failed))
    return report


def format_accuracy(rows: Sequence[Tuple[str, Dict[str, Dict[str, object]]]]) -> str:
    """Markdown: one row per case, per method the loss and gradient errors and their tolerances."""
    if not rows:
        return ""
    names = list(dict.fromkeys(n for _, report in rows for n in report))  # every method, first-seen order
    lines = [
        "Relative error against the float64 reference (fusedvae.reference on float64 copies of the "
        "inputs): loss | worst gradient (max abs error / max abs value), each with its tolerance "
        "in brackets; FAIL marks one outside it.",
        "",
        "| case | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for case, report in rows:
        cells = []
        for n in names:
            if n not in report:
                cells.append("-")
                continue
            r = report[n]
            cell = f"{r['loss_err']:.1e} [{r['loss_tol']:.2g}] \\| {r['grad_err']:.1e} [{r['grad_tol']:.2g}]"
            cells.append(cell if r["ok"] else cell + " FAIL")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (kineto prints start/stop lines there from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[..., Tensor], inputs: Sequence[Tensor], beta: float = 1.0) -> int:
    """Peak bytes held by one forward+backward of ``fn`` beyond what existed before it.

    Uses ``torch.profiler`` with ``profile_memory=True``: the CPU allocator
    reports each allocation (+bytes) and free (-bytes); the running sum of
    those events in time order peaks at the step's peak extra memory. The
    caller should have run ``fn`` once already on these shapes (compilation).
    """
    from torch.profiler import ProfilerActivity, profile

    recon, target, mu, logvar = inputs
    clear_grads(inputs)
    gc.collect()
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = step(fn, recon, target, mu, logvar, beta)
            del loss
            clear_grads(inputs)  # frees the grads inside the window; the peak already saw them
    events = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    if not events:  # a step allocates at least the gradient: no events means no measurement
        raise RuntimeError("torch.profiler recorded no CPU memory events; peak memory is unknown")
    events.sort()
    current = peak = 0
    for _, _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> Dict[str, object]:
    """Threads, CPU model, core count and versions, for the report header."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "fusedvae": getattr(fusedvae, "__version__", "?"),
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


# --------------------------------------------------------------- the bench --


def run_case(
    shape: Sequence[int] = (64, 3, 64, 64),
    latent_dim: int = 128,
    target_dtype: str = "float32",
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    beta: float = 1.0,
    memory: bool = True,
    seed: int = 0,
) -> Dict[str, object]:
    """Time forward+backward of eager, compiled and fused on the same data, and the exp+log1p yardstick.

    Returns a dict with ``case``, ``ms`` (median ms per step by method, and
    under :data:`REFERENCE` the median ms of :func:`exp_log1p_reference` over
    ``recon.numel()`` elements), ``ratio`` (``eager/fused``,
    ``compiled/fused``, and ``fused/(exp+log1p)``: how many times the
    yardstick a whole fused step takes), ``reference_numel`` (the elements
    the yardstick's tensors hold), ``times_ms`` (every sample),
    ``first_call_s`` (the first call per method, which for ``compiled``
    includes compilation unless already cached), ``loss``, ``input_bytes``
    and ``memory`` (per method ``peak_bytes``, ``peak_mb`` and ``x_input``,
    the peak over ``input_bytes``; ``None`` with ``memory=False``) and
    ``accuracy`` (:func:`accuracy`: each method's relative errors against the
    float64 truth, its tolerances and ``ok``; the caller decides what a
    failure means, :func:`main` exits 1).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    inputs = make_inputs(shape, latent_dim, target_dtype, seed=seed)
    recon, target, mu, logvar = inputs
    names = list(METHODS)
    reference_run, reference_buffers = exp_log1p_reference(recon.numel(), seed=seed)

    def timed(name: str) -> Callable[[], None]:
        # One timed call: a loss step (its grads cleared before the clock
        # starts, as every step allocates them) or the yardstick.
        if name == REFERENCE:
            return reference_run
        clear_grads(inputs)
        fn = METHODS[name]
        return lambda: step(fn, recon, target, mu, logvar, beta)

    first_call_s: Dict[str, float] = {}
    for name in names:  # first call: compiles the compiled method for this shape/dtype
        clear_grads(inputs)
        t0 = time.perf_counter()
        step(METHODS[name], recon, target, mu, logvar, beta)
        first_call_s[name] = time.perf_counter() - t0
    errors = accuracy(inputs, beta)
    timed_names = names + [REFERENCE]
    for _ in range(warmup):
        for name in timed_names:
            timed(name)()

    times: Dict[str, List[float]] = {name: [] for name in timed_names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(timed_names)
            for name in timed_names[k:] + timed_names[:k]:
                call = timed(name)
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    clear_grads(inputs)

    ms = {name: statistics.median(v) for name, v in times.items()}
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    mem = None
    if memory:
        mem = {}
        for name in names:
            peak = peak_memory_bytes(METHODS[name], inputs, beta)
            mem[name] = {"peak_bytes": peak, "peak_mb": peak / 2**20, "x_input": peak / input_bytes}
    return {
        "case": case_name(shape, latent_dim, target_dtype),
        "shape": tuple(shape),
        "latent_dim": latent_dim,
        "target_dtype": target_dtype,
        "repeats": repeats,
        "warmup": warmup,
        "ms": ms,
        "ratio": {
            "eager/fused": ms["eager"] / ms["fused"],
            "compiled/fused": ms["compiled"] / ms["fused"],
            f"fused/({REFERENCE})": ms["fused"] / ms[REFERENCE],
        },
        # The fewest elements any of the yardstick's tensors holds: all hold recon.numel().
        "reference_numel": min(t.numel() for t in reference_buffers.values()),
        "times_ms": times,
        "first_call_s": first_call_s,
        "loss": {name: r["loss"] for name, r in errors.items()},
        "accuracy": errors,
        "input_bytes": input_bytes,
        "memory": mem,
    }


def format_results(results: Sequence[Dict[str, object]], info: Optional[Dict[str, object]] = None) -> str:
    """Markdown: a header naming the machine, the time table, the accuracy table and (if measured) the memory table."""
    lines = []
    if info is not None:
        lines += [
            f"Machine: {info['cpu_model']} ({info['cpu_count']} logical CPUs), "
            f"torch.get_num_threads() = {info['torch_threads']}, CPU capability {info['cpu_capability']}; "
            f"torch {info['torch']}, fusedvae {info['fusedvae']}, Python {info['python']}.",
            "",
        ]
    if results:
        lines.append(
            f"Forward+backward of the loss, median ms per step over {results[0]['repeats']} "
            "interleaved repeats (lower is better); eager/fused and compile/fused > 1 mean fused is "
            "faster. exp+log1p ms: torch.exp then torch.log1p over as many float32 elements as "
            "recon has, into preallocated outputs, interleaved with the methods: a yardstick, not a "
            "method; fused/(exp+log1p) is how many times that a whole fused step takes."
        )
        lines.append("")
    lines += [
        f"| case | eager ms | compile ms | fused ms | {REFERENCE} ms | eager/fused | compile/fused "
        f"| fused/({REFERENCE}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ms, ratio = r["ms"], r["ratio"]
        lines.append(
            f"| {r['case']} | {ms['eager']:.3f} | {ms['compiled']:.3f} | {ms['fused']:.3f} "
            f"| {ms[REFERENCE]:.3f} | {ratio['eager/fused']:.2f}x | {ratio['compiled/fused']:.2f}x "
            f"| {ratio[f'fused/({REFERENCE})']:.2f}x |"
        )
    with_acc = [(r["case"], r["accuracy"]) for r in results if r.get("accuracy")]
    if with_acc:
        lines += ["", format_accuracy(with_acc)]
    with_mem = [r for r in results if r.get("memory")]
    if with_mem:
        lines += [
            "",
            "Peak extra CPU memory of one forward+backward (torch.profiler allocator events; "
            "includes the returned gradients), MB and multiple of the input size "
            "(recon + target + mu + logvar):",
            "",
            "| case | inputs MB | eager MB | compile MB | fused MB |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in with_mem:
            m = r["memory"]
            cells = " | ".join(
                f"{m[n]['peak_mb']:.2f} ({m[n]['x_input']:.2f}x)" for n in ("eager", "compiled", "fused")
            )
            lines.append(f"| {r['case']} | {r['input_bytes'] / 2**20:.2f} | {cells} |")
    first = [r for r in results if "first_call_s" in r]
    if first:
        lines += ["", "First compiled call (includes compilation when not cached): " + ", ".join(
            f"{r['case']} {r['first_call_s']['compiled']:.2f} s" for r in first
        ) + "."]
    return "\n".join(lines)


# ------------------------------------------- discretized mixture of logistics --

# (batch, image side): RGB images under K = 10 logistics, as PixelCNN++, VDVAE and NVAE use.
DMOL_CASES: List[Tuple[int, int]] = [(16, 32), (8, 64)]
QUICK_DMOL_CASES: List[Tuple[int, int]] = [(2, 8)]
DMOL_COMPONENTS = 10
# The accuracy bars of float32 against the float64 reference: each sample's NLL
# relative to itself, the gradient relative to its largest element.
DMOL_NLL_RTOL, DMOL_GRAD_RTOL = 2e-5, 1e-4

_compiled_dmol: Optional[Callable[..., Tensor]] = None


def _dmol_compiled(params: Tensor, target: Tensor) -> Tensor:
    global _compiled_dmol
    if _compiled_dmol is None:
        _compiled_dmol = torch.compile(reference.discretized_mix_logistic_nll)
    return _compiled_dmol(params, target)


# Eager is the reference itself: PixelCNN++'s loss, exact bins, plain PyTorch.
DMOL_METHODS: Dict[str, Callable[..., Tensor]] = {
    "eager": reference.discretized_mix_logistic_nll,
    "compiled": _dmol_compiled,
    "fused": fusedvae.discretized_mix_logistic_nll,
}


def make_dmol_inputs(batch: int, side: int, device="cpu", seed: int = 0) -> Tuple[Tensor, Tensor]:
    """float32 parameters ``[batch, 10K, side, side]`` (log-scales around -2) and uint8 images."""
    k = DMOL_COMPONENTS
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(batch, 10 * k, side, side, generator=g)
    params[:, k:].view(batch, 3, 3 * k, side, side)[:, :, k:2 * k] -= 2.0
    target = torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8)
    return params.to(device), target.to(device)


def _dmol_step(fn: Callable[..., Tensor], params: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    leaf = params.detach().requires_grad_()
    nll = fn(leaf, target)
    (grad,) = torch.autograd.grad(nll.sum(), leaf)
    return nll.detach(), grad


def _dmol_accuracy(fn: Callable[..., Tensor], params: Tensor, target: Tensor) -> Dict[str, object]:
    nll, grad = _dmol_step(fn, params, target)
    exp_nll, exp_grad = _dmol_step(reference.discretized_mix_logistic_nll, params.double(), target)
    nll_rel = float(((nll.double() - exp_nll).abs() / exp_nll.abs()).max())
    grad_rel = float((grad.double() - exp_grad).abs().max() / exp_grad.abs().max())
    ok = nll_rel <= DMOL_NLL_RTOL and grad_rel <= DMOL_GRAD_RTOL  # NaN fails
    return {"nll_rel": nll_rel, "grad_rel": grad_rel, "ok": ok}


def run_dmol_case(batch: int, side: int, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
                  device="cpu") -> Dict[str, object]:
    """Forward+backward of the discretized mixture: eager, compiled and fused on
    the same data, interleaved; each first checked against the float64 reference.
    On CUDA each step ends with a synchronisation."""
    params, target = make_dmol_inputs(batch, side, device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    accuracy_by_method = {name: _dmol_accuracy(fn, params, target) for name, fn in DMOL_METHODS.items()}
    names = list(DMOL_METHODS)
    for _ in range(warmup):
        for name in names:
            _dmol_step(DMOL_METHODS[name], params, target)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            _dmol_step(DMOL_METHODS[name], params, target)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {
        "case": f"B{batch}x3x{side}x{side}-K{DMOL_COMPONENTS}",
        "ms": ms,
        "ratio": {"eager/fused": ms["eager"] / ms["fused"], "compiled/fused": ms["compiled"] / ms["fused"]},
        "times_ms": times,
        "accuracy": accuracy_by_method,
    }


def format_dmol_results(results: Sequence[Dict[str, object]]) -> str:
    """Markdown: the discretized mixture's times and each method's error against float64."""
    lines = [
        "Discretized mixture of logistics (fusedvae.discretized_mix_logistic_nll; eager is "
        "fusedvae.reference's plain-PyTorch loss, compile the same under torch.compile), forward+backward, "
        f"median ms; relative errors against float64 (bars: NLL {DMOL_NLL_RTOL:g}, gradient {DMOL_GRAD_RTOL:g} "
        "of its largest element):",
        "",
        "| case | eager ms | compile ms | fused ms | eager/fused | compile/fused | errors eager / compile / fused |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ms, ratio = r["ms"], r["ratio"]
        errors = " / ".join(
            f"{a['nll_rel']:.1e}, {a['grad_rel']:.1e}{'' if a['ok'] else ' FAIL'}" for a in r["accuracy"].values()
        )
        lines.append(
            f"| {r['case']} | {ms['eager']:.3f} | {ms['compiled']:.3f} | {ms['fused']:.3f} "
            f"| {ratio['eager/fused']:.2f}x | {ratio['compiled/fused']:.2f}x | {errors} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m fusedvae bench`` (shared with :func:`main`)."""
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (B8x3x32x32, Z32) and few repeats: under half a minute with compilation")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed steps per method and case (default {DEFAULT_REPEATS}, "
                             f"{QUICK_REPEATS} with --quick)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed steps per method after the first call (default {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) before running (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--beta", type=float, default=1.0, help="KL weight (default 1.0)")
    parser.add_argument("--no-dmol", action="store_true",
                        help="skip the discretized-mixture cases (DMOL_CASES, QUICK_DMOL_CASES with --quick)")
    return parser


def isolate_inductor_cache() -> Optional[str]:
    """Give ``torch.compile`` a cache folder of its own per CPU capability, unless one is set.

    Inductor's cache does not tell code compiled for one CPU capability from
    another's: a run with ``ATEN_CPU_CAPABILITY=avx2`` after one at the AVX-512
    default was served the AVX-512 run's code, and its loss and gradients were
    wrong (the accuracy check caught it). Where ``TORCHINDUCTOR_CACHE_DIR`` is
    unset, it becomes ``<tmp>/fusedvae-bench-inductor-<capability>``. Returns
    that folder, or ``None`` where the variable was already set (by the caller,
    or by an earlier compilation in this process).
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    capability = torch.backends.cpu.get_cpu_capability().lower()
    path = os.path.join(tempfile.gettempdir(), f"fusedvae-bench-inductor-{capability}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the benchmark tables (markdown) for the default or ``--quick`` cases.

    Returns 1 (after printing every table) if any method is outside its
    tolerance of the float64 truth in any case, else 0.
    """
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m fusedvae bench",
        description="Time the VAE loss forward+backward on CPU: eager PyTorch, torch.compile and fusedvae.",
    ))
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    isolate_inductor_cache()
    info = machine_info()
    results = []
    for shape, latent_dim, target_dtype in cases:
        print(f"running {case_name(shape, latent_dim, target_dtype)} ...", file=sys.stderr, flush=True)
        results.append(run_case(shape, latent_dim, target_dtype, repeats=repeats, warmup=args.warmup,
                                beta=args.beta, memory=not args.no_memory))
    print(format_results(results, info))
    failed = [f"{r['case']} {name}: " + "; ".join(a["problems"])
              for r in results for name, a in r["accuracy"].items() if not a["ok"]]
    if not args.no_dmol:
        dmol_results = []
        for batch, side in QUICK_DMOL_CASES if args.quick else DMOL_CASES:
            print(f"running the discretized mixture at B{batch}x3x{side}x{side} ...", file=sys.stderr, flush=True)
            dmol_results.append(run_dmol_case(batch, side, repeats=repeats, warmup=args.warmup))
        print()
        print(format_dmol_results(dmol_results))
        failed += [f"{r['case']} {name}: NLL {a['nll_rel']:.2e}, gradient {a['grad_rel']:.2e}"
                   for r in dmol_results for name, a in r["accuracy"].items() if not a["ok"]]
    for line in failed:
        print(f"not within tolerance of the float64 reference: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
