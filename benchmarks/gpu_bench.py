"""GPU benchmark: forward+backward of the VAE loss, eager vs torch.compile vs fused.

    python benchmarks/gpu_bench.py [--batch 64] [--size 256] [--latent 512] [--iters 50]

The three methods are those of the CPU benchmark (``fusedvae.bench.METHODS``:
``eager_loss``, the same under ``torch.compile``, ``fusedvae.vae_loss``).
Prints ms per step, the GB/s achieved on the minimum bytes a fused
forward+backward must move (fp32 recon and target: 20 B/element; uint8
target: 14; bf16 recon + uint8 target: 8) and that as a percentage of the
device's copy bandwidth, measured in the same run.

Before timing, every method's loss and gradients are compared with a float64
truth: ``fusedvae.reference`` on float64 CPU copies of the same inputs (a uint8
target read as value/255 in float64), each within the tolerance of the
precision the method computes in (``fusedvae.bench.accuracy``). The relative
errors are printed in a second table; the script exits 1, after every case has
run, if any method is outside its tolerance.
"""
import argparse
import statistics
import sys

import torch

import fusedvae
from fusedvae import bench

# (name, recon dtype, target dtype, minimum bytes per element for fwd+bwd)
CASES = [
    ("fp32 recon, fp32 target", torch.float32, torch.float32, 20),
    ("fp32 recon, uint8 target", torch.float32, torch.uint8, 14),
    ("bf16 recon, uint8 target", torch.bfloat16, torch.uint8, 8),
]


def time_cuda(fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes, iters):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), iters)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_inputs(shape, latent, recon_dtype, target_dtype, seed=0, device="cuda"):
    """recon (logits), target, mu, logvar; recon, mu, logvar require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    recon = torch.randn(shape, device=device, generator=g).to(recon_dtype).requires_grad_()
    if target_dtype == torch.uint8:
        target = torch.randint(0, 256, shape, device=device, generator=g, dtype=torch.uint8)
    else:
        target = torch.rand(shape, device=device, generator=g)
    mu = torch.randn(shape[0], latent, device=device, generator=g).requires_grad_()
    logvar = torch.randn(shape[0], latent, device=device, generator=g).requires_grad_()
    return recon, target, mu, logvar


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--beta", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")
    if not fusedvae.has_cuda_kernels():
        raise SystemExit("gpu_bench.py: fusedvae was built without CUDA kernels")

    shape = (args.batch, 3, args.size, args.size)
    numel = torch.Size(shape).numel()
    copy_gbs = copy_bandwidth_gbs(numel * 4, args.iters)
    methods = bench.METHODS
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  shape {shape}  Z {args.latent}")
    print(f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s\n")
    print("| case | eager ms | compile ms | fused ms | fused GB/s (min bytes) | % of copy | eager/fused | compile/fused |")
    print("|---|---|---|---|---|---|---|---|")
    accuracy_rows = []
    for name, recon_dtype, target_dtype, min_bytes in CASES:
        inputs = make_inputs(shape, args.latent, recon_dtype, target_dtype)
        # One step of each method (compiling the compiled one) against the float64 truth.
        accuracy_rows.append((name, bench.accuracy(inputs, args.beta, methods)))

        def step(f):
            def run():
                bench.clear_grads(inputs)
                f(*inputs, args.beta).backward()
            return run

        ms = {label: time_cuda(step(f), args.iters) for label, f in methods.items()}
        bench.clear_grads(inputs)
        gbs = min_bytes * numel / (ms["fused"] * 1e-3) / 1e9
        print(f"| {name} | {ms['eager']:.3f} | {ms['compiled']:.3f} | {ms['fused']:.3f} | {gbs:.0f} | "
              f"{100 * gbs / copy_gbs:.0f} % | {ms['eager'] / ms['fused']:.2f} | {ms['compiled'] / ms['fused']:.2f} |",
              flush=True)
        del inputs
    print()
    print(bench.format_accuracy(accuracy_rows))
    failed = [f"{case} {method}: " + "; ".join(r["problems"])
              for case, report in accuracy_rows for method, r in report.items() if not r["ok"]]
    for line in failed:
        print(f"not within tolerance of the float64 reference: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
