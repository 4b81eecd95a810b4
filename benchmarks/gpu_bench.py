"""GPU benchmark: forward+backward of the VAE loss, eager vs torch.compile vs fused, against the floor.

    python benchmarks/gpu_bench.py [--batch 64] [--size 256] [--latent 512] [--iters 50] [--repeats 5]
                                   [--warmup 3] [--beta 1] [--no-dmol] [--cuda-wide-loads]
                                   [--cuda-fast-exp] [--cuda-accurate-mixture]
                                   [--cuda-mixture-fast-scale]

The three methods are those of the CPU benchmark (``fusedvae.bench.METHODS``:
``eager_loss``, the same under ``torch.compile``, ``fusedvae.vae_loss``). After
them, unless ``--no-dmol``, the discretized mixture of logistics
(:data:`DMOL_CASES`: ``[B, 3, H, W]`` uint8 images under K = 10 components,
float32 parameters ``[B, 10K, H, W]``), whose step is the per-sample NLL summed
and its gradient w.r.t. the parameters, for ``fusedvae.reference``'s
``discretized_mix_logistic_nll`` (eager), the same under ``torch.compile`` and
``fusedvae.discretized_mix_logistic_nll`` (:data:`DMOL_METHODS`). Kernels
other than the default ones are timed as ``fused_variant``, beside fused, in
the same run, on the same inputs (:func:`switched`): in the VAE cases, with
``--cuda-wide-loads`` the opt-in kernels that load 16 bytes of the narrower
operand per access and with ``--cuda-fast-exp`` the opt-in kernels that take
the logits likelihoods' exponential from the hardware's instead of ``expf``
(both given: both on); in the discretized mixture's, with
``--cuda-accurate-mixture`` the kernels with ``logf`` and ``expf`` instead of
the hardware's approximations, the default, and with
``--cuda-mixture-fast-scale`` the opt-in kernels that also take the inverse
scales and the bin widths' ``expm1`` from the hardware's exponential.

Per case it prints:

- the floor: the fewest bytes a fused forward+backward must move
  (:func:`min_bytes`: the forward reads ``recon`` and ``target``, the
  backward reads them again and writes ``recon``'s gradient, and the same
  for ``mu`` and ``logvar`` without a target: 3 x recon + 2 x target bytes
  per element, 20 for float32 recon and target, 14 for a uint8 target, 8
  for a bfloat16 recon and a uint8 target) divided by the copy bandwidth
  measured in the same run (a device-to-device copy of at least 1 GiB,
  read and write counted);
- the device time of one step of each method (eager, compiled, fused): the
  step (forward, then ``torch.autograd.grad`` into the gradients of
  ``recon``, ``mu`` and ``logvar``) captured in one ``torch.cuda.CUDAGraph``
  and replayed, timed with CUDA events, so that no launch cost of the host
  is in it. A method whose step cannot be captured is timed with CUDA
  events around eager steps instead, and the table says so;
- fused as a share of the floor (``floor ms / fused ms``) and the ratios
  ``eager/fused`` and ``compile/fused``;
- in a second table, the host's time per step without graphs: the wall time
  to enqueue ``N`` steps, divided by ``N``. It is what the host spends
  launching a step; where it exceeds the device time, a program without
  graphs runs at the host's pace;
- for the discretized mixture, in another table, each method's extra peak
  device memory in one step without graphs (:func:`peak_extra_bytes`), in MB
  and as a multiple of the decoder output (the parameters' bytes); the
  returned gradient, as large as that, is part of it.

The discretized mixture's floor (:func:`dmol_min_bytes`) is the parameters
read once, the target read once and the parameters' gradient written once: the
fewest bytes of any implementation, one that computed the gradient in the same
pass as the NLL. A forward, then a backward that reads both again (the VAE
cases' floor, and the fused kernel's design) move the parameters and the
target once more: with float32 parameters and uint8 images that step is at
most 67 % of this floor.

Before timing, every method's loss and gradients are compared with a float64
truth: ``fusedvae.reference`` on float64 CPU copies of the same inputs (a uint8
target read as value/255 in float64), each within the tolerance of the
precision the method computes in (``fusedvae.bench.accuracy``). The relative
errors are printed in a third table; the script exits 1, after every case has
run, if any method is outside its tolerance. The discretized mixture is checked
by ``fusedvae.bench``'s own check (the worst per-sample NLL and the gradient
against ``fusedvae.reference`` in float64 on the same device, within
``bench.DMOL_NLL_RTOL`` and ``bench.DMOL_GRAD_RTOL``), in the same table.

Everything but the CUDA timers (:func:`capture_step`, :func:`time_graph`,
:func:`time_events`, :func:`copy_bandwidth_gbs`, :func:`peak_extra_bytes`, the
defaults of :func:`device_timers`) and :func:`main` works on plain numbers or on any
device; ``benchmarks/test_gpu_bench.py`` runs it on the CPU, :func:`run_cases`
and :func:`run_dmol_cases` included, with stand-ins for the CUDA timers.
"""
import argparse
import contextlib
import functools
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fusedvae
from fusedvae import bench, reference

GIB = 2**30
# The copy that measures the bandwidth moves at least this much: a smaller one
# can stay partly in the L2 cache (50-60 MB on an H100/H200) and would report
# more than the memory can give.
MIN_COPY_BYTES = GIB
LATENT_DTYPE = torch.float32  # mu and logvar, as make_inputs makes them
METHOD_NAMES = ("eager", "compiled", "fused")  # the table's order
# fused with kernels other than the default ones: in the VAE cases the opt-in
# wide loads under --cuda-wide-loads (fusedvae._C._set_cuda_wide_loads) and the
# approximate exponential under --cuda-fast-exp (_set_cuda_fast_exp), in the
# mixture's logf and expf under --cuda-accurate-mixture
# (_set_cuda_mixture_fast_math off) and its approximate inverse scales and bin
# widths under --cuda-mixture-fast-scale (_set_cuda_mixture_fast_scale).
VARIANT = "fused_variant"


def element_bytes(recon_itemsize: int, target_itemsize: int) -> int:
    """Fewest bytes per element of ``recon`` a fused forward+backward moves.

    The forward reads ``recon`` and ``target``; the backward reads both again
    (nothing of the size of ``recon`` may be saved between them without being
    written and read back) and writes ``recon``'s gradient, in ``recon``'s
    dtype: ``3 * recon_itemsize + 2 * target_itemsize``.
    """
    return 3 * recon_itemsize + 2 * target_itemsize


def latent_bytes(batch: int, latent: int, itemsize: int = 4) -> int:
    """Fewest bytes the KL term moves: ``mu`` and ``logvar`` ``[batch, latent]``.

    Each is read by the forward, read again by the backward and has its
    gradient written: 3 passes over each of the two tensors.
    """
    return 2 * 3 * batch * latent * itemsize


def min_bytes(numel: int, recon_itemsize: int, target_itemsize: int, batch: int, latent: int,
              latent_itemsize: int = 4) -> int:
    """Fewest bytes a fused forward+backward moves: :func:`element_bytes` per element plus :func:`latent_bytes`."""
    return numel * element_bytes(recon_itemsize, target_itemsize) + latent_bytes(batch, latent, latent_itemsize)


# (name, recon dtype, target dtype, minimum bytes per element for fwd+bwd)
CASES = [
    (name, recon, target, element_bytes(recon.itemsize, target.itemsize))
    for name, recon, target in [
        ("fp32 recon, fp32 target", torch.float32, torch.float32),
        ("fp32 recon, uint8 target", torch.float32, torch.uint8),
        ("bf16 recon, uint8 target", torch.bfloat16, torch.uint8),
    ]
]


# The discretized mixture's parameters and images, as bench.make_dmol_inputs makes them.
DMOL_PARAMS_DTYPE, DMOL_TARGET_DTYPE = torch.float32, torch.uint8


def dmol_params_bytes(batch: int, side: int, itemsize: int = 4, components: int = bench.DMOL_COMPONENTS) -> int:
    """Bytes of the decoder output ``[batch, 10K, side, side]`` of an RGB discretized mixture of K logistics."""
    return batch * 10 * components * side * side * itemsize


def dmol_min_bytes(batch: int, side: int, params_itemsize: int = 4, target_itemsize: int = 1,
                   components: int = bench.DMOL_COMPONENTS) -> int:
    """Fewest bytes a forward+backward of the discretized mixture moves (the module docstring says why).

    The parameters read once, the ``[batch, 3, side, side]`` target read once,
    the parameters' gradient written once.
    """
    target_bytes = batch * 3 * side * side * target_itemsize
    return 2 * dmol_params_bytes(batch, side, params_itemsize, components) + target_bytes


# (name, batch, image side, minimum bytes for fwd+bwd)
DMOL_CASES = [
    (f"DMOL {b}x3x{s}x{s}, K={bench.DMOL_COMPONENTS}", b, s,
     dmol_min_bytes(b, s, DMOL_PARAMS_DTYPE.itemsize, DMOL_TARGET_DTYPE.itemsize))
    for b, s in [(32, 32), (8, 64), (4, 256)]
]

# Those of fusedvae.bench, but compiled for one shape at a time as the VAE
# cases' compiled method is (dynamic=False: a training loop sees one shape;
# by default the second shape would be recompiled with symbolic shapes).
DMOL_METHODS = {**bench.DMOL_METHODS,
                "compiled": torch.compile(reference.discretized_mix_logistic_nll, dynamic=False)}


def copy_bytes(*needed: int) -> int:
    """Bytes the bandwidth copy moves: the largest of ``needed`` and :data:`MIN_COPY_BYTES`."""
    return max((MIN_COPY_BYTES, *needed))


def bandwidth_gbs(nbytes_copied: int, ms: float) -> float:
    """GB/s (1e9 bytes) of a copy of ``nbytes_copied`` bytes taking ``ms``: read and write counted."""
    if ms <= 0:
        raise ValueError(f"a copy takes a positive time, got {ms} ms")
    return 2 * nbytes_copied / (ms * 1e-3) / 1e9


def floor_ms(nbytes: int, gbs: float) -> float:
    """ms to move ``nbytes`` at ``gbs`` GB/s (1e9 bytes per second)."""
    if gbs <= 0:
        raise ValueError(f"bandwidth must be positive, got {gbs} GB/s")
    return nbytes / (gbs * 1e9) * 1e3


def percent_of_floor(floor: float, measured: float) -> float:
    """``100 * floor / measured``: 100 % is a step that moves its bytes at copy speed."""
    return 100.0 * floor / measured


def case_row(name: str, nbytes: int, copy_gbs: float, ms: Dict[str, float],
             host_ms: Optional[Dict[str, float]] = None, how: Optional[Dict[str, str]] = None,
             peak_bytes: Optional[Dict[str, int]] = None, output_bytes: Optional[int] = None) -> Dict[str, object]:
    """One case's numbers for :func:`format_table`, from plain numbers.

    ``ms`` maps each method (``eager``, ``compiled``, ``fused``) to its device
    ms per step, ``host_ms`` to its host ms per step; ``how`` maps a method to
    how it was timed where that is not a graph replay (a reason, printed);
    ``peak_bytes`` to its extra peak memory, shown as a multiple of
    ``output_bytes`` (the decoder output) in ``x_output``.
    """
    peak_bytes = dict(peak_bytes or {})
    floor = floor_ms(nbytes, copy_gbs)
    return {
        "case": name,
        "min_bytes": nbytes,
        "floor_ms": floor,
        "ms": dict(ms),
        "host_ms": dict(host_ms or {}),
        "percent_of_floor": percent_of_floor(floor, ms["fused"]),
        "percent_of_floor_variant": percent_of_floor(floor, ms[VARIANT]) if VARIANT in ms else None,
        "eager/fused": ms["eager"] / ms["fused"],
        "compiled/fused": ms["compiled"] / ms["fused"],
        "how": dict(how or {}),
        "peak_bytes": peak_bytes,
        "output_bytes": output_bytes,
        "x_output": {m: b / output_bytes for m, b in peak_bytes.items()},
    }


def format_table(rows: Sequence[Dict[str, object]], copy_gbs: float, copy_nbytes: int) -> str:
    """Markdown: the device-time table, the notes on methods not captured, the host-time and memory tables."""
    variant = any(VARIANT in r["ms"] for r in rows)
    lines = [
        f"Copy bandwidth: {copy_gbs:.0f} GB/s (device-to-device copy of {copy_nbytes / GIB:.2f} GiB, "
        "read + write counted). floor = fewest bytes a fused forward+backward moves / that bandwidth.",
        "Device ms per step: one forward+backward captured in a CUDA graph and replayed, timed with "
        "CUDA events (no host launch cost in it); * marks a method timed with events around eager "
        "steps instead (see below). % of floor = floor ms / fused ms.",
        "",
        "| case | min MB | floor ms | eager ms | compile ms | fused ms | fused % of floor "
        "| eager/fused | compile/fused |" + (" fused variant ms | variant % of floor |" if variant else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if variant else ""),
    ]
    notes = []
    for r in rows:
        cells = []
        for method in METHOD_NAMES + ((VARIANT,) if VARIANT in r["ms"] else ()):
            mark = ""
            if method in r["how"]:
                mark = "*"
                notes.append(f"* {r['case']}, {method}: {r['how'][method]}")
            cells.append(f"{r['ms'][method]:.3f}{mark}")
        variant_cells = ""
        if variant:
            variant_cells = (f" {cells.pop()} | {r['percent_of_floor_variant']:.0f} % |" if VARIANT in r["ms"]
                             else " - | - |")
        lines.append(
            f"| {r['case']} | {r['min_bytes'] / 1e6:.4g} | {r['floor_ms']:.4g} | " + " | ".join(cells)
            + f" | {r['percent_of_floor']:.0f} % | {r['eager/fused']:.2f}x | {r['compiled/fused']:.2f}x |"
            + variant_cells
        )
    if notes:
        lines += [""] + notes
    with_host = [r for r in rows if r["host_ms"]]
    if with_host:
        lines += [
            "",
            "Host ms per step without graphs: wall time to enqueue N eager steps / N. The host's "
            "cost of launching a step, not device time; where it exceeds the device time, a program "
            "without graphs runs at this pace (and where the device is slower, the host also waits "
            "for room in the launch queue).",
            "",
            "| case | eager host ms | compile host ms | fused host ms |" + (" fused variant host ms |" if variant else ""),
            "|---|---:|---:|---:|" + ("---:|" if variant else ""),
        ]
        for r in with_host:
            h = r["host_ms"]
            variant_cell = (f" {h[VARIANT]:.3f} |" if VARIANT in h else " - |") if variant else ""
            lines.append(f"| {r['case']} | {h['eager']:.3f} | {h['compiled']:.3f} | {h['fused']:.3f} |" + variant_cell)
    with_memory = [r for r in rows if r["peak_bytes"]]
    if with_memory:
        lines += [
            "",
            "Extra peak device memory of one step without graphs: torch.cuda.max_memory_allocated during "
            "the step minus memory_allocated before it (the inputs), the returned gradient included; MB "
            "and multiple of the decoder output (params bytes). The goal for fused is at most 1.2x.",
            "",
            "| case | params MB | eager MB | compile MB | fused MB |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in with_memory:
            cells = " | ".join(f"{r['peak_bytes'][m] / 1e6:.1f} ({r['x_output'][m]:.2f}x)" for m in METHOD_NAMES)
            lines.append(f"| {r['case']} | {r['output_bytes'] / 1e6:.1f} | {cells} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- steps --


def make_inputs(shape, latent, recon_dtype, target_dtype, seed=0, device="cuda"):
    """recon (logits), target, mu, logvar; recon, mu, logvar require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    recon = torch.randn(shape, device=device, generator=g).to(recon_dtype).requires_grad_()
    if target_dtype == torch.uint8:
        target = torch.randint(0, 256, shape, device=device, generator=g, dtype=torch.uint8)
    else:
        target = torch.rand(shape, device=device, generator=g)
    mu = torch.randn(shape[0], latent, device=device, generator=g, dtype=LATENT_DTYPE).requires_grad_()
    logvar = torch.randn(shape[0], latent, device=device, generator=g, dtype=LATENT_DTYPE).requires_grad_()
    return recon, target, mu, logvar


def make_step(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], beta: float = 1.0
              ) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """One forward+backward of ``fn``: returns ``(loss, grad recon, grad mu, grad logvar)``.

    The gradients come from ``torch.autograd.grad``, not ``.backward()``: no
    ``.grad`` is read, zeroed or accumulated into, so a captured step does
    exactly the work of one step (an accumulation would add a zeroing and an
    add over ``recon``'s size) and its outputs live in the graph's pool,
    rewritten by every replay.
    """
    recon, target, mu, logvar = inputs
    leaves = (recon, mu, logvar)

    def run():
        loss = fn(recon, target, mu, logvar, beta)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    return run


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _release(device) -> None:
    # The graphs' pools, before the next case allocates.
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def dmol_accuracy(params: torch.Tensor, target: torch.Tensor,
                  methods: Optional[Dict[str, Callable[..., torch.Tensor]]] = None) -> Dict[str, Dict[str, object]]:
    """``fusedvae.bench``'s float64 check of each discretized-mixture method, in :func:`bench.accuracy`'s form.

    ``loss_err`` is the worst per-sample relative error of the NLL, ``grad_err``
    the gradient's largest absolute error over its largest element, against
    ``fusedvae.reference`` in float64; the tolerances are ``bench.DMOL_NLL_RTOL``
    and ``bench.DMOL_GRAD_RTOL``. So the rows join :func:`report`'s table and failures.
    """
    report = {}
    for name, fn in (DMOL_METHODS if methods is None else methods).items():
        a = bench._dmol_accuracy(fn, params, target)
        errors = (("NLL", a["nll_rel"], bench.DMOL_NLL_RTOL), ("gradient", a["grad_rel"], bench.DMOL_GRAD_RTOL))
        problems = [f"{what}: relative error {err:.2e} > {tol:.2g}" for what, err, tol in errors if not err <= tol]
        report[name] = {"loss_err": a["nll_rel"], "loss_tol": bench.DMOL_NLL_RTOL, "grad_err": a["grad_rel"],
                        "grad_tol": bench.DMOL_GRAD_RTOL, "ok": not problems, "problems": problems}
    return report


def time_host(fn: Callable[[], object], iters: int, device="cpu") -> float:
    """Host ms per call: wall time of ``iters`` calls of ``fn`` / ``iters``.

    On a CUDA ``device`` the device is synchronised before the clock starts and
    not before it stops, so this is the time to enqueue the work, not to do
    it (unless the launch queue fills and the host waits for room).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    _synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - t0
    _synchronize(device)
    return elapsed * 1e3 / iters


def interleave(timers: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, float]:
    """Median over ``repeats`` rounds of each timer's ms, the order rotating every round.

    Each timer returns one sample in ms; rotating the order spreads drift in
    clocks and temperature over every method alike.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(timers)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timers[name]())
    return {name: statistics.median(v) for name, v in samples.items()}


# ------------------------------------------------ CUDA only: the timers --


def capture_step(step: Callable[[], object], warmup: int = 3) -> Tuple["torch.cuda.CUDAGraph", object]:
    """Capture ``step`` in a CUDA graph; returns the graph and the captured outputs (static).

    Warm-up calls on a side stream first (they compile the compiled method's
    kernels and create handles and workspaces, none of which may happen during
    capture), as in torch.cuda.graphs' whole-network recipe.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    graph.replay()  # the first replay uploads the graph: keep that out of the timed ones
    torch.cuda.synchronize()
    return graph, outputs


def _recover_from_capture() -> None:
    # A capture that raised may leave its side stream current (torch.cuda.graph
    # restores the stream only after ending the capture cleanly): the eager
    # fallback and every later timer record their events on the default stream.
    torch.cuda.set_stream(torch.cuda.default_stream())
    torch.cuda.synchronize()


def time_graph(graph: "torch.cuda.CUDAGraph", iters: int) -> float:
    """Device ms per replay of ``graph``: CUDA events around ``iters`` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def time_events(fn: Callable[[], object], iters: int) -> float:
    """Device ms per call of ``fn``: CUDA events around ``iters`` calls launched from the host."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def peak_extra_bytes(step: Callable[[], object]) -> int:
    """Peak device bytes one call of ``step`` (no graph) holds beyond what was allocated before, outputs included."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth_gbs(nbytes: int, iters: int, repeats: int) -> float:
    """Copy bandwidth in GB/s (read + write) of a device-to-device copy of ``nbytes`` bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch, outside the timing
    ms = interleave({"copy": lambda: time_events(lambda: dst.copy_(src), iters)}, repeats)["copy"]
    return bandwidth_gbs(nbytes, ms)


def device_timers(steps: Dict[str, Callable[[], object]], iters: int, warmup: int,
                  capture: Callable = capture_step, time_replays: Callable = time_graph,
                  time_eager: Callable = time_events, recover: Optional[Callable[[], None]] = None,
                  ) -> Tuple[Dict[str, Callable[[], float]], Dict[str, str], list]:
    """A timer per method: graph replays where the step captures, else events around eager steps.

    Returns the timers (each returns one sample in ms per step), ``how``
    (method -> why it is not a graph replay, for the table) and what must
    stay alive while the graphs replay (graphs and their outputs).
    ``capture``, ``time_replays``, ``time_eager`` and ``recover`` (run after a
    failed capture) are the CUDA
    functions of this module unless replaced, so the choice can be tested
    without a GPU.
    """
    recover = _recover_from_capture if recover is None else recover
    timers, how, keep = {}, {}, []
    for name, step in steps.items():
        try:
            graph, outputs = capture(step, warmup)
        except Exception as e:  # noqa: BLE001 - any failure to capture means: time it another way
            recover()
            reason = (str(e).strip().splitlines() or [""])[0][:120]
            how[name] = f"not captured ({type(e).__name__}: {reason}); timed with CUDA events around eager steps"
            timers[name] = lambda step=step: time_eager(step, iters)
            continue
        keep.append((graph, outputs))
        timers[name] = lambda graph=graph: time_replays(graph, iters)
    return timers, how, keep


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50, help="steps (replays) per timed sample and host timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per method, interleaved; the median is shown")
    parser.add_argument("--warmup", type=int, default=3, help="steps on a side stream before each capture")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--no-dmol", action="store_true", help="skip the discretized-mixture cases (DMOL_CASES)")
    parser.add_argument("--cuda-wide-loads", action="store_true",
                        help="also time fused with the opt-in kernels that load 16 bytes of the narrower operand "
                             "per access in the VAE cases (a fused_variant column, checked against the float64 "
                             "truth like the others)")
    parser.add_argument("--cuda-fast-exp", action="store_true",
                        help="also time fused with the opt-in approximate exponential of the logits likelihoods in "
                             "the VAE cases (with --cuda-wide-loads, both on in one fused_variant column)")
    parser.add_argument("--cuda-accurate-mixture", action="store_true",
                        help="also time fused with logf and expf instead of the hardware's approximations in the "
                             "discretized-mixture cases (a fused_variant column, checked like the others)")
    parser.add_argument("--cuda-mixture-fast-scale", action="store_true",
                        help="also time fused with the opt-in approximate inverse scales and bin widths in the "
                             "discretized-mixture cases (a fused_variant column, checked like the others)")
    args = parser.parse_args(argv)
    for name in ("batch", "size", "latent", "iters", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def case_bytes(args: argparse.Namespace) -> Dict[str, int]:
    """:func:`min_bytes` of every case of :data:`CASES` at the shape the arguments ask for."""
    numel = args.batch * 3 * args.size * args.size
    return {name: min_bytes(numel, r.itemsize, t.itemsize, args.batch, args.latent, LATENT_DTYPE.itemsize)
            for name, r, t, _ in CASES}


def time_case(name: str, steps: Dict[str, Callable[[], object]], nbytes: int, copy_gbs: float,
              args: argparse.Namespace, device, timers: Callable, **memory) -> Dict[str, object]:
    """Device and host times of each method's step, as a :func:`case_row` (``memory``: its memory arguments)."""
    step_timers, how, keep = timers(steps, args.iters, args.warmup)
    ms = interleave(step_timers, args.repeats)
    host_ms = {label: time_host(s, args.iters, device) for label, s in steps.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), file=sys.stderr, flush=True)
    return case_row(name, nbytes, copy_gbs, ms, host_ms, how, **memory)


# A kernel switch's setter (fusedvae._C._set_cuda_<name>) and the value to give it.
Setting = Tuple[Callable[[bool], bool], bool]


@contextlib.contextmanager
def switched(*settings: Setting):
    """Kernel switches (``fusedvae._C._set_cuda_wide_loads``, ``_set_cuda_fast_exp``,
    ``_set_cuda_mixture_fast_math``), each ``(setter, value)``, set inside the block, their
    previous settings restored after it."""
    with contextlib.ExitStack() as stack:
        for setter, value in settings:
            stack.callback(setter, setter(value))
        yield


def with_switches(step: Callable[[], object], *settings: Setting) -> Callable[[], object]:
    """``step`` (forward and backward) run under :func:`switched`; a graph captured from it replays those kernels."""
    def run():
        with switched(*settings):
            return step()
    return run


# The kernel switches each kind of case can time (run_cases, run_dmol_cases):
# argument name -> (switch, value), fusedvae._C._set_cuda_<switch> setting it.
VAE_SWITCHES = {"cuda_wide_loads": ("wide_loads", True), "cuda_fast_exp": ("fast_exp", True)}
DMOL_SWITCHES = {"cuda_accurate_mixture": ("mixture_fast_math", False),
                 "cuda_mixture_fast_scale": ("mixture_fast_scale", True)}


def variant_settings(args: argparse.Namespace, switches: Dict[str, Tuple[str, bool]]) -> List[Setting]:
    """The settings of the switches among ``switches`` that ``args`` asks for."""
    return [(getattr(fusedvae._C, f"_set_cuda_{name}"), value)
            for arg, (name, value) in switches.items() if getattr(args, arg)]


def run_cases(args: argparse.Namespace, copy_gbs: float, device="cuda", timers: Callable = device_timers,
              ) -> Tuple[List[Dict[str, object]], List[Tuple[str, Dict[str, Dict[str, object]]]]]:
    """Check and time every case on ``device``: the rows for :func:`format_table` and the accuracy reports.

    ``timers`` makes the device timers (:func:`device_timers`, which needs
    CUDA); everything else here runs on any device.
    """
    shape = (args.batch, 3, args.size, args.size)
    nbytes = case_bytes(args)
    methods = bench.METHODS
    rows, accuracy_rows = [], []
    for name, recon_dtype, target_dtype, _ in CASES:
        inputs = make_inputs(shape, args.latent, recon_dtype, target_dtype, device=device)
        # One step of each method (compiling the compiled one) against the float64 truth.
        accuracy = bench.accuracy(inputs, args.beta, methods)
        steps = {label: make_step(f, inputs, args.beta) for label, f in methods.items()}
        settings = variant_settings(args, VAE_SWITCHES)
        if settings:
            with switched(*settings):
                accuracy[VARIANT] = bench.accuracy(inputs, args.beta, {"fused": methods["fused"]})["fused"]
            steps[VARIANT] = with_switches(steps["fused"], *settings)
        accuracy_rows.append((name, accuracy))
        rows.append(time_case(name, steps, nbytes[name], copy_gbs, args, device, timers))
        del inputs, steps
        _release(device)
    return rows, accuracy_rows


def run_dmol_cases(args: argparse.Namespace, copy_gbs: float, device="cuda", timers: Callable = device_timers,
                   peak: Callable[[Callable[[], object]], int] = peak_extra_bytes, cases: Sequence = DMOL_CASES,
                   ) -> Tuple[List[Dict[str, object]], List[Tuple[str, Dict[str, Dict[str, object]]]]]:
    """:func:`run_cases` for the discretized mixture's ``cases``, each row with every method's extra peak memory.

    ``peak`` measures one step's (:func:`peak_extra_bytes`, which needs CUDA).
    """
    rows, accuracy_rows = [], []
    for name, batch, side, nbytes in cases:
        params, target = bench.make_dmol_inputs(batch, side, device)
        accuracy = dmol_accuracy(params, target)  # compiles the compiled method too
        steps = {label: functools.partial(bench._dmol_step, f, params, target) for label, f in DMOL_METHODS.items()}
        settings = variant_settings(args, DMOL_SWITCHES)
        if settings:
            with switched(*settings):
                accuracy[VARIANT] = dmol_accuracy(params, target, {"fused": DMOL_METHODS["fused"]})["fused"]
            steps[VARIANT] = with_switches(steps["fused"], *settings)
        accuracy_rows.append((name, accuracy))
        peak_bytes = {label: peak(s) for label, s in steps.items()}
        rows.append(time_case(name, steps, nbytes, copy_gbs, args, device, timers,
                              peak_bytes=peak_bytes, output_bytes=params.numel() * params.element_size()))
        del params, target, steps
        _release(device)
    return rows, accuracy_rows


def report(rows: Sequence[Dict[str, object]], accuracy_rows: Sequence[Tuple[str, Dict[str, Dict[str, object]]]],
           copy_gbs: float, copy_nbytes: int) -> Tuple[str, List[str]]:
    """The printed tables, and one line per method and case outside its tolerance of the float64 truth."""
    text = format_table(rows, copy_gbs, copy_nbytes) + "\n\n" + bench.format_accuracy(accuracy_rows)
    failed = [f"{case} {method}: " + "; ".join(r["problems"])
              for case, acc in accuracy_rows for method, r in acc.items() if not r["ok"]]
    return text, failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every case and print the tables; returns 1 if a method is outside its tolerance, else 0."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")
    if not fusedvae.has_cuda_kernels():
        raise SystemExit("gpu_bench.py: fusedvae was built without CUDA kernels")
    shape = (args.batch, 3, args.size, args.size)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  shape {shape}  Z {args.latent}"
          f"  kernels timed beside fused: wide loads {'yes' if args.cuda_wide_loads else 'no'},"
          f" fast exp {'yes' if args.cuda_fast_exp else 'no'},"
          f" mixture with logf and expf {'yes' if args.cuda_accurate_mixture else 'no'},"
          f" mixture fast scale {'yes' if args.cuda_mixture_fast_scale else 'no'}", flush=True)
    dmol_cases = [] if args.no_dmol else DMOL_CASES
    copy_nbytes = copy_bytes(*case_bytes(args).values(), *(c[3] for c in dmol_cases))
    copy_gbs = copy_bandwidth_gbs(copy_nbytes, max(1, args.iters // 5), args.repeats)
    torch.cuda.empty_cache()  # the copy's buffers back to the device before the cases
    rows, accuracy_rows = run_cases(args, copy_gbs)
    dmol_rows, dmol_accuracy_rows = run_dmol_cases(args, copy_gbs, cases=dmol_cases)
    rows, accuracy_rows = rows + dmol_rows, accuracy_rows + dmol_accuracy_rows
    text, failed = report(rows, accuracy_rows, copy_gbs, copy_nbytes)
    print()
    print(text)
    for line in failed:
        print(f"not within tolerance of the float64 reference: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
