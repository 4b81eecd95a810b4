"""GPU benchmark: forward+backward of the VAE loss, eager vs torch.compile vs fused.

    python benchmarks/gpu_bench.py [--batch 64] [--size 256] [--iters 50]

Prints ms per step, the GB/s achieved on the minimum bytes a fused
forward+backward must move (fp32 recon and target: 20 B/element; uint8
target: 14; bf16 recon + uint8 target: 8) and that as a percentage of the
device's copy bandwidth, measured in the same run.
"""
import argparse
import statistics

import torch

import fusedvae
from fusedvae.bench import eager_loss

# (name, recon dtype, target dtype, minimum bytes per element for fwd+bwd)
CASES = [
    ("fp32 recon, fp32 target", torch.float32, torch.float32, 20),
    ("fp32 recon, uint8 target", torch.float32, torch.uint8, 14),
    ("bf16 recon, uint8 target", torch.bfloat16, torch.uint8, 8),
]


def fused_loss(recon, target, mu, logvar, beta=1.0):
    return fusedvae.vae_loss(recon, target, mu, logvar, beta=beta).loss


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")

    shape = (args.batch, 3, args.size, args.size)
    numel = torch.Size(shape).numel()
    copy_gbs = copy_bandwidth_gbs(numel * 4, args.iters)
    compiled = torch.compile(eager_loss)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  shape {shape}  Z {args.latent}")
    print(f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s\n")
    print("| case | eager ms | compile ms | fused ms | fused GB/s (min bytes) | % of copy | eager/fused | compile/fused |")
    print("|---|---|---|---|---|---|---|---|")
    for name, recon_dtype, target_dtype, min_bytes in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        recon = torch.randn(shape, device="cuda", generator=g).to(recon_dtype).requires_grad_()
        if target_dtype == torch.uint8:
            target = torch.randint(0, 256, shape, device="cuda", generator=g, dtype=torch.uint8)
        else:
            target = torch.rand(shape, device="cuda", generator=g)
        mu = torch.randn(args.batch, args.latent, device="cuda", generator=g).requires_grad_()
        logvar = torch.randn(args.batch, args.latent, device="cuda", generator=g).requires_grad_()
        inputs = (recon, target, mu, logvar)
        losses = [f(*inputs).item() for f in (eager_loss, compiled, fused_loss)]
        if max(losses) - min(losses) > 1e-3 * abs(losses[0]):
            raise SystemExit(f"{name}: the three losses disagree: {losses}")

        def step(f):
            def run():
                for v in (recon, mu, logvar):
                    v.grad = None
                f(*inputs).backward()
            return run

        ms = {label: time_cuda(step(f), args.iters) for label, f in
              (("eager", eager_loss), ("compile", compiled), ("fused", fused_loss))}
        gbs = min_bytes * numel / (ms["fused"] * 1e-3) / 1e9
        print(f"| {name} | {ms['eager']:.3f} | {ms['compile']:.3f} | {ms['fused']:.3f} | {gbs:.0f} | "
              f"{100 * gbs / copy_gbs:.0f} % | {ms['eager'] / ms['fused']:.2f} | {ms['compile'] / ms['fused']:.2f} |")


if __name__ == "__main__":
    main()
