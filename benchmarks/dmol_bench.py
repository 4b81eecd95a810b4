"""The discretized mixture of logistics, forward+backward: eager vs torch.compile vs fused.

    python benchmarks/dmol_bench.py [--quick] [--repeats 10] [--threads N] [--device cpu|cuda]

Eager is ``fusedvae.reference.discretized_mix_logistic_nll`` (PixelCNN++'s
published loss with the exact bin probability, in plain PyTorch), compiled is
the same under ``torch.compile``, fused is
``fusedvae.discretized_mix_logistic_nll``; all on the same float32 parameters
(K = 10) and uint8 images, each checked first against the float64 reference
(per-sample NLL within 2e-5 relative, gradient within 1e-4 of its largest
element). Prints median ms per step over interleaved repeats; on CUDA each step
ends with a synchronisation (device time by graph replay is gpu_bench.py's).
"""
import argparse
import statistics
import sys
import time

import torch

import fusedvae
from fusedvae import reference

CASES = [(16, 32), (8, 64)]  # (batch, image side), RGB, K = 10
QUICK_CASES = [(2, 8)]
K = 10


def make_inputs(batch, side, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(batch, 10 * K, side, side, generator=g)
    params[:, K:].view(batch, 3, 3 * K, side, side)[:, :, K:2 * K] -= 2.0  # log-scales around -2
    target = torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8)
    return params.to(device), target.to(device)


def step(fn, params, target):
    leaf = params.detach().requires_grad_()
    nll = fn(leaf, target)
    (grad,) = torch.autograd.grad(nll.sum(), leaf)
    return nll, grad


def check(name, fn, params, target):
    """The method's NLL and gradient against the float64 reference; returns the errors."""
    nll, grad = (t.detach() for t in step(fn, params, target))
    exp_nll, exp_grad = (t.detach() for t in step(reference.discretized_mix_logistic_nll, params.double(), target))
    nll_err = float(((nll.double() - exp_nll).abs() / exp_nll.abs()).max())
    grad_err = float((grad.double() - exp_grad).abs().max() / exp_grad.abs().max())
    ok = nll_err <= 2e-5 and grad_err <= 1e-4
    return {"method": name, "nll_rel": nll_err, "grad_rel": grad_err, "ok": ok}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case (2x3x8x8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    methods = {
        "eager": reference.discretized_mix_logistic_nll,
        "compiled": torch.compile(reference.discretized_mix_logistic_nll),
        "fused": fusedvae.discretized_mix_logistic_nll,
    }
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, K = {K}")
    print()
    print("| case | eager ms | compile ms | fused ms | eager/fused | compile/fused |")
    print("|---|---:|---:|---:|---:|---:|")
    failed = []
    for batch, side in QUICK_CASES if args.quick else CASES:
        params, target = make_inputs(batch, side, device)
        for name, fn in methods.items():
            result = check(name, fn, params, target)
            if not result["ok"]:
                failed.append((f"{batch}x3x{side}x{side}", result))
        times = {name: [] for name in methods}
        names = list(methods)
        for r in range(args.repeats):
            for name in names[r % 3:] + names[:r % 3]:
                sync()
                t0 = time.perf_counter()
                step(methods[name], params, target)
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
        ms = {name: statistics.median(v) for name, v in times.items()}
        print(f"| {batch}x3x{side}x{side} | {ms['eager']:.2f} | {ms['compiled']:.2f} | {ms['fused']:.2f} "
              f"| {ms['eager'] / ms['fused']:.2f}x | {ms['compiled'] / ms['fused']:.2f}x |", flush=True)
    for case, result in failed:
        print(f"not within tolerance of the float64 reference: {case} {result}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
