"""Whole VAE training steps with the loss computed four ways: what a user feels.

One step is ``optimizer.zero_grad(); recon, mu, logvar = model(x);
loss = loss_fn(recon, x, mu, logvar); loss.backward(); optimizer.step()``
(Adam), for three models:

- ``mlp``: the MLP VAE of Kingma & Welling on 28x28 (784-400-20), batch 128;
- ``conv64``: a conv VAE on 3x64x64 with the encoder/decoder widths 32..512
  and latent 128 of AntixK/PyTorch-VAE's VanillaVAE, batch 64;
- ``ldm256``: a latent-diffusion-style autoencoder on 3x256x256 (GroupNorm/SiLU
  residual conv blocks, a spatial latent 4x32x32), a small batch by default
  so that it runs on a CPU.

Each model's step runs with the Bernoulli-logits negative ELBO (``batchmean``,
beta = 1) computed four ways, on the same data and from the same initial
weights:

- ``eager``: written by hand in eager PyTorch (``fusedvae.bench.eager_loss``);
- ``compiled``: the same function under ``torch.compile`` (``bench.compiled_loss``);
- ``fused``: ``fusedvae.vae_loss`` (``bench.fused_loss``);
- ``free``: a near-free stand-in, ``recon.mean() + mu.mean() + logvar.mean()``,
  through which backward still reaches every parameter. A step with a loss
  minus the step with ``free`` is that loss's share of the step.

Before timing, each real loss is checked against ``fusedvae.reference`` in
float64 on the same model outputs (``bench.accuracy``); the run stops with an
error if any is outside its tolerance.

Timing: the four variants are interleaved (the order rotates every repeat) so
that drift in machine load hits them alike; a repeat times a block of steps
(enough for ``--block-ms``) and the table gives the median ms per step over
the repeats, with the interquartile range. On the CPU the step is timed by
wall clock with ``--threads`` torch threads. On CUDA, two ways:

- ``graph``: the device time of a step. The whole step is captured in one
  ``torch.cuda.CUDAGraph`` (static input batch, ``Adam(capturable=True)``;
  warm-up steps on a side stream first, as in PyTorch's "whole network
  capture" recipe) and replayed, timed with CUDA events: no host in the way.
- ``no graph``: the ordinary eager-mode step (``Adam`` defaults), synchronised
  wall time per step, which is what a user without graphs feels; where it
  exceeds ``graph``, the host's launch cost sets the pace. ``host`` is the
  part of it the host spends issuing the step (wall time before the
  synchronisation).

``--host-overhead`` times the loss alone instead (forward+backward, no model)
at a size where no kernel matters (batch 8 of 1x8x8, latent 4; one thread by
default): the host's cost per call, in microseconds.

Run from the repository root::

    python benchmarks/train_step.py --threads 2
    python benchmarks/train_step.py --host-overhead
    python benchmarks/train_step.py --quick          # tiny sizes: a smoke run
    python benchmarks/train_step.py --device cuda --out train_step_cuda.md
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fusedvae
from fusedvae import bench

LossFn = Callable[..., Tensor]
Timer = Callable[[int], Dict[str, float]]

BETA = 1.0
LR = 1e-4
DEFAULT_REPEATS = 10
QUICK_REPEATS = 3
DEFAULT_WARMUP = 3  # the recipe's warm-up count before capture; also compiles the compiled loss
QUICK_WARMUP = 1
DEFAULT_BLOCK_MS = 50.0  # time per timed block of steps: long against the clock's and the loop's noise


# ---------------------------------------------------------------- models --


class MLPVAE(nn.Module):
    """Kingma & Welling's MLP VAE: 784-400-(20, 20) encoder, 20-400-784 decoder (logits)."""

    def __init__(self, image: int = 28, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.image = image
        d = image * image
        self.fc1 = nn.Linear(d, hidden)
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = F.relu(self.fc1(x.flatten(1)))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self.fc4(F.relu(self.fc3(z)))
        return recon.view_as(x), mu, logvar


class ConvVAE(nn.Module):
    """AntixK/PyTorch-VAE's VanillaVAE, with logits out (no final Tanh).

    Encoder: per width a 3x3 stride-2 conv, BatchNorm and LeakyReLU (64 -> 2
    for five widths), then linear layers to mu and logvar. Decoder: a linear
    layer back to the smallest map, 3x3 stride-2 transposed convs through the
    widths in reverse, and a last transposed conv plus a 3x3 conv to the
    image's channels.
    """

    def __init__(self, channels: int = 3, image: int = 64, widths: Sequence[int] = (32, 64, 128, 256, 512),
                 latent: int = 128):
        super().__init__()
        widths = list(widths)
        self.side = image >> len(widths)
        if self.side < 1 or self.side << len(widths) != image:
            raise ValueError(f"image size {image} must be a multiple of 2**{len(widths)}")
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.LeakyReLU()]
            c = w
        self.encoder = nn.Sequential(*layers)
        flat = widths[-1] * self.side * self.side
        self.fc_mu = nn.Linear(flat, latent)
        self.fc_logvar = nn.Linear(flat, latent)
        self.decoder_input = nn.Linear(latent, flat)
        rev = widths[::-1]
        layers = []
        for a, b in zip(rev[:-1], rev[1:]):
            layers += [nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(b), nn.LeakyReLU()]
        self.decoder = nn.Sequential(*layers)
        self.final = nn.Sequential(
            nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(rev[-1]), nn.LeakyReLU(),
            nn.Conv2d(rev[-1], channels, 3, padding=1),
        )
        self.widths = widths

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(x).flatten(1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        h = self.decoder_input(z).view(-1, self.widths[-1], self.side, self.side)
        return self.final(self.decoder(h)), mu, logvar


def _groups(c: int) -> int:
    # latent-diffusion uses 32 groups on 128+ channels; fewer channels get
    # groups of 4 so that every width here divides evenly.
    return min(32, max(1, c // 4))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LDMAutoencoder(nn.Module):
    """A latent-diffusion-style KL autoencoder (f = 8: 3x256x256 -> 4x32x32), logits out.

    The layout of latent-diffusion's ``Encoder``/``Decoder`` (CompVis, kl-f8):
    a conv in, per level ``res_blocks`` residual blocks of GroupNorm, SiLU and
    3x3 convs, a stride-2 conv between levels (nearest upsampling and a conv
    in the decoder), a middle block, GroupNorm, SiLU and a conv out to the mean
    and log-variance of the latent, the log-variance clamped to [-30, 20] as
    there. Without the middle attention block and with fewer channels by
    default (``channels`` = 32, latent-diffusion uses 128), so that a CPU
    runs a step in about a second.
    """

    def __init__(self, channels: int = 32, mult: Sequence[int] = (1, 2, 4, 4), res_blocks: int = 1,
                 z_channels: int = 4, image_channels: int = 3):
        super().__init__()
        widths = [channels * m for m in mult]
        enc: List[nn.Module] = [nn.Conv2d(image_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(res_blocks):
                enc.append(_ResBlock(c, w))
                c = w
            if i != len(widths) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [_ResBlock(c, c), nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, 2 * z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: List[nn.Module] = [nn.Conv2d(z_channels, c, 3, padding=1), _ResBlock(c, c)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(res_blocks):
                dec.append(_ResBlock(c, w))
                c = w
            if i != 0:
                dec.append(_Upsample(c))
        dec += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, image_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


@dataclasses.dataclass
class ModelSpec:
    """A model to benchmark: its name in the table, its batch and how to build it."""

    key: str
    title: str
    batch: int
    shape: Tuple[int, ...]  # one sample
    build: Callable[[], nn.Module]


MODEL_KEYS = ("mlp", "conv64", "ldm256")


def model_specs(quick: bool = False, ldm_batch: Optional[int] = None, ldm_channels: Optional[int] = None,
                device: str = "cpu") -> Dict[str, ModelSpec]:
    """The three models at their real sizes, or tiny ones with ``quick`` (a smoke run)."""
    if quick:
        ch = ldm_channels or 8
        return {
            "mlp": ModelSpec("mlp", "MLP 64-32-4", 8, (1, 8, 8), lambda: MLPVAE(8, 32, 4)),
            "conv64": ModelSpec("conv64", "conv VAE 3x32x32 Z8", 4, (3, 32, 32),
                                lambda: ConvVAE(3, 32, (4, 8, 8, 16, 16), 8)),
            "ldm256": ModelSpec("ldm256", f"LDM AE 3x32x32 -> 4x4x4 ch{ch}", ldm_batch or 2, (3, 32, 32),
                                lambda: LDMAutoencoder(ch)),
        }
    ch = ldm_channels or 32
    # A GPU has room for latent-diffusion's own batch sizes; a CPU takes about
    # a second per sample-step at 256x256.
    batch = ldm_batch or (16 if device == "cuda" else 2)
    return {
        "mlp": ModelSpec("mlp", "MLP 784-400-20", 128, (1, 28, 28), lambda: MLPVAE()),
        "conv64": ModelSpec("conv64", "conv VAE 3x64x64 Z128", 64, (3, 64, 64), lambda: ConvVAE()),
        "ldm256": ModelSpec("ldm256", f"LDM AE 3x256x256 -> 4x32x32 ch{ch}", batch, (3, 256, 256),
                            lambda: LDMAutoencoder(ch)),
    }


# ---------------------------------------------------------------- losses --


def free_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0) -> Tensor:
    """A near-free stand-in: three means, so backward still reaches every parameter."""
    return recon.mean() + mu.mean() + logvar.mean()


# The names of the real losses are those of bench.METHODS: bench.compute_dtype
# gives each its tolerance by name.
LOSSES: Dict[str, LossFn] = {
    "eager": bench.eager_loss,
    "compiled": bench.compiled_loss,
    "fused": bench.fused_loss,
    "free": free_loss,
}
REAL_LOSSES = ("eager", "compiled", "fused")


def check_losses(model: nn.Module, x: Tensor, methods: Sequence[str] = REAL_LOSSES,
                 beta: float = BETA) -> Dict[str, Dict[str, object]]:
    """Each loss against ``fusedvae.reference`` in float64 on one set of the model's outputs.

    The outputs are detached into leaves, and ``bench.accuracy`` compares each
    method's loss and gradients with the float64 truth. Raises
    ``AssertionError`` naming every method outside its tolerance.
    """
    with torch.no_grad():
        outputs = model(x)
    recon, mu, logvar = (t.detach().clone().requires_grad_() for t in outputs)
    report = bench.accuracy((recon, x, mu, logvar), beta, {m: LOSSES[m] for m in methods})
    failed = [f"{m}: " + "; ".join(r["problems"]) for m, r in report.items() if not r["ok"]]
    if failed:
        raise AssertionError("not within tolerance of the float64 reference: " + " | ".join(failed))
    return report


# ------------------------------------------------------------- the steps --


class Runner:
    """One model and its Adam, stepping with one loss on one batch."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, capturable: bool = False,
                 beta: float = BETA):
        self.model, self.loss_fn, self.x, self.beta = model, loss_fn, x, beta
        self.opt = torch.optim.Adam(model.parameters(), lr=LR, capturable=capturable)
        self.loss: Optional[Tensor] = None

    def step(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        recon, mu, logvar = self.model(self.x)
        loss = self.loss_fn(recon, self.x, mu, logvar, self.beta)
        loss.backward()
        self.opt.step()
        self.loss = loss.detach()
        return self.loss


def cpu_timer(runner: Runner) -> Timer:
    """Wall time of ``n`` steps on the CPU, in ms per step."""

    def run(n: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        for _ in range(n):
            runner.step()
        return {"step": (time.perf_counter() - t0) * 1e3 / n}

    return run


def capture_step(runner: Runner, warmup: int) -> "torch.cuda.CUDAGraph":
    """Capture one whole training step of ``runner`` in a CUDA graph.

    PyTorch's "whole network capture" recipe (torch.cuda.graphs): warm-up
    steps on a side stream (they create Adam's state, cuBLAS/cuDNN handles and
    workspaces, and compile the compiled loss, none of which may happen during
    capture), grads set to None so that the captured backward allocates them
    from the graph's private pool, then one captured step. Replaying it
    rewrites the grads in place, so no zero_grad is needed between replays;
    the optimizer must be ``capturable`` (its step count lives on the device).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            runner.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    runner.opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        runner.step()  # its zero_grad finds the grads None: a no-op
    return graph


def cuda_timer(graphed: Runner, graph: "torch.cuda.CUDAGraph", eager: Runner) -> Timer:
    """Per step: device time of graph replays (CUDA events); wall and host time of eager steps."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run(n: int) -> Dict[str, float]:
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        graph_ms = start.elapsed_time(end) / n
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            eager.step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return {"graph": graph_ms, "nograph": (t2 - t0) * 1e3 / n, "host": (t1 - t0) * 1e3 / n}

    return run


# What each metric is, for the table: (column title, whether a loss share is shown).
METRICS = {
    "step": ("step ms", True),
    "graph": ("graph ms (device)", True),
    "nograph": ("no-graph ms (synced)", True),
    "host": ("host ms (issue)", False),
}


def interleave(timers: Dict[str, Timer], repeats: int, block: int) -> Dict[str, Dict[str, List[float]]]:
    """``repeats`` rounds of ``block`` steps per timer, the order rotating every round.

    Returns ``{name: {metric: [ms per step, one per round]}}``.
    """
    names = list(timers)
    out: Dict[str, Dict[str, List[float]]] = {n: {} for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                for metric, ms in timers[name](block).items():
                    out[name].setdefault(metric, []).append(ms)
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def block_size(timers: Dict[str, Timer], block_ms: float) -> int:
    """Steps per timed block: enough for ``block_ms`` at the fastest variant's speed (one untimed step each)."""
    fastest = min(next(iter(t(1).values())) for t in timers.values())
    return max(1, math.ceil(block_ms / max(fastest, 1e-3)))


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Median and interquartile range (q1, q3) of ms samples."""
    v = sorted(samples)
    if len(v) == 1:
        return {"median": v[0], "q1": v[0], "q3": v[0]}
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return {"median": statistics.median(v), "q1": q1, "q3": q3}


def run_model(spec: ModelSpec, device: str, repeats: int, warmup: int, block_ms: float,
              seed: int = 0, losses: Sequence[str] = tuple(LOSSES)) -> Dict[str, object]:
    """Check the losses, then time the training step of ``spec`` with each loss; see the module docstring."""
    torch.manual_seed(seed)
    model = spec.build().to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((spec.batch,) + tuple(spec.shape), generator=g).to(device)  # the static batch, in [0, 1]
    accuracy = check_losses(model, x, [m for m in losses if m in REAL_LOSSES])

    def runner(loss: str, capturable: bool = False) -> Runner:
        return Runner(copy.deepcopy(model), LOSSES[loss], x, capturable=capturable)

    timers: Dict[str, Timer] = {}
    runners: List[Runner] = []
    if device == "cuda":
        for loss in losses:
            graphed = runner(loss, capturable=True)
            graph = capture_step(graphed, warmup)
            eager = runner(loss)
            for _ in range(warmup):
                eager.step()
            timers[loss] = cuda_timer(graphed, graph, eager)
            runners += [graphed, eager]
    else:
        for loss in losses:
            r = runner(loss)
            for _ in range(warmup):
                r.step()
            timers[loss] = cpu_timer(r)
            runners.append(r)
    block = block_size(timers, block_ms)
    samples = interleave(timers, repeats, block)
    # The last step of every runner (for a graph: of its last replay) computed a finite loss.
    bad = [f"{r.loss_fn.__name__}: {float(r.loss)}" for r in runners if not bool(torch.isfinite(r.loss))]
    if bad:
        raise AssertionError(f"{spec.title}: training steps gave non-finite losses: " + ", ".join(bad))
    return {
        "key": spec.key, "model": spec.title, "batch": spec.batch, "device": device,
        "repeats": repeats, "block": block, "accuracy": accuracy,
        "ms": {loss: {m: summarize(v) for m, v in per.items()} for loss, per in samples.items()},
        "samples": samples,
    }


# ------------------------------------------------------------ the tables --


def _fmt(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def format_steps(results: Sequence[Dict[str, object]]) -> str:
    """Markdown: per model and loss, the median ms per step [q1–q3] and the loss's share, per metric."""
    if not results:
        return ""
    metrics = list(results[0]["ms"][next(iter(results[0]["ms"]))])
    head = ["model", "batch", "loss"]
    align = ["---", "---:", "---"]
    for m in metrics:
        title, share = METRICS[m]
        head += [title, "q1–q3"]
        align += ["---:", "---:"]
        if share:
            head.append("loss share ms (% of step)")
            align.append("---:")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in results:
        ms = r["ms"]
        for loss, per in ms.items():
            cells = [r["model"], str(r["batch"]), loss]
            for m in metrics:
                s = per[m]
                cells += [_fmt(s["median"]), f"{_fmt(s['q1'])}–{_fmt(s['q3'])}"]
                if METRICS[m][1]:
                    if loss == "free" or "free" not in ms:
                        cells.append("")
                    else:
                        d = s["median"] - ms["free"][m]["median"]
                        cells.append(f"{_fmt(d)} ({100 * d / s['median']:.0f} %)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(device: str) -> str:
    info = bench.machine_info()
    line = (f"Machine: {info['cpu_model']} ({info['cpu_count']} logical CPUs), CPU capability "
            f"{info['cpu_capability']}, torch.get_num_threads() = {info['torch_threads']}; "
            f"torch {info['torch']}, fusedvae {info['fusedvae']}, Python {info['python']}")
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        line += f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    try:
        # Other processes on the cores stall every parallel region of a
        # multi-threaded step (a worker waits for a time slice): say so.
        line += f"; load average {os.getloadavg()[0]:.1f} at the start"
    except OSError:
        pass
    return line + "."


def steps_report(results: Sequence[Dict[str, object]], device: str, warmup: int) -> str:
    r0 = results[0]
    if device == "cuda":
        how = ("`graph`: the whole step captured in one CUDA graph and replayed, timed with CUDA events "
               "(device time); `no-graph`: the eager-mode step, synchronised wall time (host-bound "
               "where it exceeds `graph`); `host`: the host's time to issue it.")
    else:
        how = "wall time on the CPU."
    text = [
        "Whole training steps (zero_grad, forward, loss, backward, Adam step): median ms per step over "
        f"{r0['repeats']} interleaved repeats of a block of steps (after {warmup} warm-up steps), "
        "with the interquartile range; " + how + " Loss share: the step minus the step with the "
        "near-free stand-in loss `free`.",
        "",
        format_steps(results),
        "",
        "Steps per timed block: " + ", ".join(f"{r['model']} {r['block']}" for r in results) + ".",
        "",
        bench.format_accuracy([(r["model"], r["accuracy"]) for r in results]),
    ]
    return "\n".join(text)


# ---------------------------------------------------- host time per call --

HOST_SHAPE = (8, 1, 8, 8)
HOST_LATENT = 4
HOST_CALLS = 200  # calls per timed block


def host_overhead(device: str = "cpu", repeats: int = 20, calls: int = HOST_CALLS, warmup: int = 20,
                  losses: Sequence[str] = tuple(LOSSES)) -> Dict[str, object]:
    """Forward+backward of the loss alone at a size where only the host's per-call cost counts.

    ``recon`` ``[8, 1, 8, 8]``, latent 4, leaves requiring grad whose grads are
    set to None before each call (outside the timed region, as in
    ``fusedvae.bench``). Each call is timed alone; a repeat is the mean over
    ``calls`` calls; the losses are interleaved across repeats. On CUDA the
    device is synchronised after each block, outside the timing: the times are
    what the host spends issuing a call.
    """
    inputs = tuple(t.detach().to(device).requires_grad_(t.requires_grad)
                   for t in bench.make_inputs(HOST_SHAPE, HOST_LATENT, "float32"))
    recon, target, mu, logvar = inputs
    report = bench.accuracy(inputs, BETA, {m: LOSSES[m] for m in losses if m in REAL_LOSSES})
    failed = [f"{m}: " + "; ".join(r["problems"]) for m, r in report.items() if not r["ok"]]
    if failed:
        raise AssertionError("not within tolerance of the float64 reference: " + " | ".join(failed))

    def timer(fn: LossFn) -> Timer:
        def run(n: int) -> Dict[str, float]:
            total = 0.0
            for _ in range(n):
                bench.clear_grads(inputs)
                t0 = time.perf_counter()
                bench.step(fn, recon, target, mu, logvar, BETA)
                total += time.perf_counter() - t0
            if device == "cuda":
                torch.cuda.synchronize()
            return {"call": total * 1e6 / n}
        return run

    timers = {m: timer(LOSSES[m]) for m in losses}
    for t in timers.values():
        t(warmup)
    samples = interleave(timers, repeats, calls)
    bench.clear_grads(inputs)
    return {
        "device": device, "repeats": repeats, "calls": calls, "accuracy": report,
        "us": {m: summarize(v["call"]) for m, v in samples.items()}, "samples": samples,
    }


def format_host(result: Dict[str, object]) -> str:
    us = result["us"]
    base = us["eager"]["median"] if "eager" in us else None
    lines = [
        f"Host time per call of the loss alone, forward+backward, recon [{', '.join(map(str, HOST_SHAPE))}], "
        f"latent {HOST_LATENT} ({result['device']}): median µs per call over {result['repeats']} "
        f"interleaved repeats of {result['calls']} calls, with the interquartile range.",
        "",
        "| loss | µs per forward+backward | q1–q3 | / eager |",
        "|---|---:|---:|---:|",
    ]
    for m, s in us.items():
        ratio = f"{s['median'] / base:.2f}x" if base else ""
        lines.append(f"| {m} | {s['median']:.1f} | {s['q1']:.1f}–{s['q3']:.1f} | {ratio} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main --


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/train_step.py",
        description="Whole VAE training steps with the loss eager, compiled, fused and near-free.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", nargs="+", choices=MODEL_KEYS, default=list(MODEL_KEYS),
                   help="which models (default: all three)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed blocks per model and loss (default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps per variant before timing (default {DEFAULT_WARMUP}, "
                        f"{QUICK_WARMUP} with --quick)")
    p.add_argument("--block-ms", type=float, default=DEFAULT_BLOCK_MS,
                   help=f"about how long one timed block of steps takes (default {DEFAULT_BLOCK_MS:g})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: torch's choice; 1 with --host-overhead)")
    p.add_argument("--quick", action="store_true", help="tiny models and few repeats: a smoke run")
    p.add_argument("--ldm-batch", type=int, default=None,
                   help="batch of the ldm256 model (default 2 on the CPU, 16 on CUDA)")
    p.add_argument("--ldm-channels", type=int, default=None,
                   help="base channels of the ldm256 model (default 32; latent-diffusion's kl-f8 has 128)")
    p.add_argument("--host-overhead", action="store_true",
                   help="time the loss alone at a tiny size (host cost per call) instead of training steps")
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    for name in ("repeats", "warmup", "threads", "ldm_batch", "ldm_channels"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    if args.block_ms <= 0:
        p.error("--block-ms must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        if not fusedvae.has_cuda_kernels():
            raise SystemExit("--device cuda: fusedvae was built without its CUDA kernels")
    threads = args.threads if args.threads is not None else (1 if args.host_overhead else None)
    if threads is not None:
        torch.set_num_threads(threads)
    lines = [machine_line(args.device), "", "Command: `python benchmarks/train_step.py " + " ".join(argv) + "`", ""]
    # Past torch._dynamo's recompile limit (8 shapes per function in one
    # process), "compiled" would silently run eager code: fail instead.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        lines += _run(args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _run(args: argparse.Namespace) -> List[str]:
    """The report's tables for the parsed options."""
    lines = []
    if args.host_overhead:
        repeats = args.repeats or (QUICK_REPEATS if args.quick else 20)
        calls = 20 if args.quick else HOST_CALLS
        result = host_overhead(args.device, repeats=repeats, calls=calls)
        case = bench.case_name(HOST_SHAPE, HOST_LATENT, "float32")
        lines += [format_host(result), "", bench.format_accuracy([(case, result["accuracy"])])]
    else:
        repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
        warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
        specs = model_specs(args.quick, args.ldm_batch, args.ldm_channels, args.device)
        results = []
        for key in args.models:
            print(f"running {specs[key].title} ...", file=sys.stderr, flush=True)
            results.append(run_model(specs[key], args.device, repeats, warmup, args.block_ms))
            if args.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        lines.append(steps_report(results, args.device, warmup))
    return lines


if __name__ == "__main__":
    sys.exit(main())
