"""The discretized mixture of logistics, forward+backward: eager vs torch.compile vs fused.

    python benchmarks/dmol_bench.py [--quick] [--repeats 10] [--threads N] [--device cpu|cuda]

The cases of ``python -m fusedvae bench`` (``fusedvae.bench.run_dmol_case``) on
any device: eager is ``fusedvae.reference.discretized_mix_logistic_nll``
(PixelCNN++'s loss with exact bins, plain PyTorch), compiled the same under
``torch.compile``, fused ``fusedvae.discretized_mix_logistic_nll``; K = 10,
float32 parameters, uint8 images, each method checked against the float64
reference first. Median ms per step over interleaved repeats; on CUDA each
step ends with a synchronisation. Exits 1 if a method misses the accuracy bars.
"""
import argparse
import sys

import torch

from fusedvae import bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case (2x3x8x8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench.isolate_inductor_cache()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print()
    results = [bench.run_dmol_case(batch, side, repeats=args.repeats, warmup=1, device=args.device)
               for batch, side in (bench.QUICK_DMOL_CASES if args.quick else bench.DMOL_CASES)]
    print(bench.format_dmol_results(results))
    failed = [f"{r['case']} {name}: {a}" for r in results for name, a in r["accuracy"].items() if not a["ok"]]
    for line in failed:
        print(f"not within tolerance of the float64 reference: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
