"""``python -m fusedvae demo``: small convolutional VAEs trained with :func:`fusedvae.vae_loss`.

Everything runs on the CPU on data that ships with scikit-learn (no download):

- *digits*: ``sklearn.datasets.load_digits()``, 1797 8x8 grey digits with values
  0..16, scaled to [0, 1] and upsampled (bilinear) to 16x16, so N = 256 values per
  image; a Bernoulli (logits) likelihood on these grey levels.
- *photo patches*: ``sklearn.datasets.load_sample_images()`` (two 427x640 RGB
  photographs) cut into non-overlapping 16x16 RGB patches (N = 768), kept as
  uint8 and passed to ``vae_loss`` as uint8 targets (read as value/255).

Both are split at random into train and test sets. The experiments, each
writing PNG pictures into ``--out`` and a ``report.md`` that links them:

1. the classic per-pixel-mean failure against its two fixes (``batchmean`` with
   beta=1; ``mean`` with ``normalized_beta``), with the equivalence of the fixes
   checked numerically;
2. a beta sweep drawn as a rate-distortion curve (test set);
3. per-latent-dimension KL with the active units marked;
4. Bernoulli vs continuous Bernoulli vs sigma-VAE Gaussian on photo patches;
5. the time of one training step, fused loss vs the same loss in eager PyTorch.

Needs the ``demo`` extra: ``pip install fusedvae[demo]`` (matplotlib,
scikit-learn, tqdm).

The package holds one module per concern: ``data`` (the two data sets),
``models`` (the conv VAE), ``losses`` (the per-element-mean mistake),
``training``, ``evaluation``, ``plots`` (``image_grid``), ``experiments``
(the five experiments and their settings) and ``report`` (``report.md``);
this module runs them all (:func:`run_demo`) and holds the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from ..bench import eager_loss
from .data import load_digits_data, load_photo_patches
from .evaluation import Evaluation, decoder_mse, evaluate
from .experiments import (
    ACTIVE_UNIT_THRESHOLD,
    FULL,
    LIKELIHOODS,
    QUICK,
    Settings,
    experiment_failure,
    experiment_kl_dims,
    experiment_likelihoods,
    experiment_sweep,
    experiment_timing,
)
from .losses import classic_mistake_loss, mistake_equivalent_beta
from .models import ConvVAE, display_mean
from .plots import image_grid
from .report import write_report
from .training import RunConfig, TrainResult, train_vae

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "ConvVAE",
    "Evaluation",
    "FULL",
    "LIKELIHOODS",
    "OUTPUT_FILES",
    "PICTURES",
    "QUICK",
    "RunConfig",
    "Settings",
    "TrainResult",
    "add_arguments",
    "classic_mistake_loss",
    "decoder_mse",
    "display_mean",
    "eager_loss",
    "evaluate",
    "experiment_failure",
    "experiment_kl_dims",
    "experiment_likelihoods",
    "experiment_sweep",
    "experiment_timing",
    "image_grid",
    "load_digits_data",
    "load_photo_patches",
    "main",
    "mistake_equivalent_beta",
    "run_demo",
    "train_vae",
    "write_report",
]

PICTURES = (
    "fig1_failure_vs_fix.png",
    "fig1_training_curves.png",
    "fig2_rate_distortion.png",
    "fig2_beta_sweep_recons.png",
    "fig3_kl_per_dim.png",
    "fig4_likelihoods.png",
    "fig5_timing.png",
)
OUTPUT_FILES = PICTURES + ("report.md", "results.json")


def run_demo(out: str, quick: bool = False, likelihood: str = "all", seed: int = 0, progress: bool = True) -> dict:
    """Run every experiment, write the pictures, ``report.md`` and ``results.json`` into ``out``."""
    t_start = time.perf_counter()
    st = QUICK if quick else FULL
    os.makedirs(out, exist_ok=True)
    likelihoods = LIKELIHOODS if likelihood == "all" else (likelihood,)
    digits_train, digits_test = load_digits_data(seed)
    patch_train, patch_test = load_photo_patches(seed)
    res: dict = {"quick": quick, "seed": seed, "eval_samples": st.eval_samples, "data": {
        "digits_train": int(digits_train.shape[0]), "digits_test": int(digits_test.shape[0]),
        "patches_train": int(patch_train.shape[0]), "patches_test": int(patch_test.shape[0])}}

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log("1/5 failure vs fix")
    e1 = experiment_failure(digits_train, digits_test, st, seed, out, progress, res)
    log("2/5 beta sweep")
    sweep = experiment_sweep(digits_train, digits_test, st, seed, out, progress, res,
                             (e1["runs"]["b"], e1["evals"]["b"]))
    log("3/5 per-dim KL")
    top = max(st.sweep_betas)
    experiment_kl_dims({"β=1 (b)": e1["evals"]["b"], f"β={top:g}": sweep[top],
                        f"(a) mistake, β={res['failure']['N']}": e1["evals"]["a"]}, out, res)
    log("4/5 likelihoods")
    experiment_likelihoods(patch_train, patch_test, likelihoods, st, seed, out, progress, res)
    log("5/5 timing")
    experiment_timing({"digits": (digits_train, 16, 128), "photo patches": (patch_train, 32, 128)},
                      st, seed, out, res)
    res["total_seconds"] = time.perf_counter() - t_start
    write_report(res, out, PICTURES)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    log(f"done: {os.path.join(out, 'report.md')}")
    return res


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m fusedvae demo`` (shared with :func:`main`)."""
    parser.add_argument("--quick", action="store_true",
                        help="few training steps and a 3-point β sweep: every file in well under a minute")
    parser.add_argument("--out", default="fusedvae_demo", help="output folder (default: ./fusedvae_demo)")
    parser.add_argument("--likelihood", choices=LIKELIHOODS + ("all",), default="all",
                        help="likelihoods compared in experiment 4 on photo patches (default: all); "
                             "experiments 1-3 and 5 use the Bernoulli likelihood on digits")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and noise")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads(N) (default 1: these models are too small to gain from "
                             "more, and on a loaded machine extra threads mostly wait)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo and print where the report is."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m fusedvae demo",
        description="Train small VAEs with fusedvae.vae_loss on scikit-learn's digits and sample photos; "
                    "write pictures and report.md.",
    ))
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(f"python -m fusedvae demo needs the demo extra (pip install 'fusedvae[demo]'): {exc}", file=sys.stderr)
        return 2
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    run_demo(args.out, quick=args.quick, likelihood=args.likelihood, seed=args.seed, progress=not args.no_progress)
    print(os.path.join(args.out, "report.md"))
    return 0

