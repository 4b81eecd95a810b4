"""Train a small ``diffusers.AutoencoderKL`` with fusedvae's latent-diffusion objective.

The autoencoder of latent diffusion (Rombach et al. 2022), at a small size and from a
random initialisation, learns to encode 32x32 patches of scikit-learn's two bundled
photographs into a 4x8x8 latent, with :class:`fusedvae.AutoencoderKLLoss`: per-pixel L1
scaled by a learned ``logvar``, plus ``kl_weight`` times the posterior's KL. No
perceptual network and no GAN (neither can be downloaded here): ``perceptual`` and the
adversarial term are where a full training would add them.

Writes ``reconstructions.png`` (test patches, their reconstructions from the posterior
mean, and the absolute error) and ``metrics.json`` into ``--out``; 2 to 3 minutes on
2 CPU cores with the defaults::

    python examples/train_autoencoder_kl.py --out fusedvae_autoencoder_kl

Needs the ``examples`` extra (``pip install -e ".[examples]"``: diffusers) and the
``demo`` extra (scikit-learn's photographs, matplotlib, tqdm).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import fusedvae
from fusedvae.demo.data import load_photo_patches
from fusedvae.demo.plots import image_grid


def small_autoencoder_kl():
    """A latent-diffusion autoencoder at toy size: three resolution levels (f = 4),
    one ResNet block each, 4 latent channels; about 1M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to [-1, 1], latent diffusion's input range."""
    return pixels.float() / 127.5 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1.0) / 2.0).clamp(0, 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="fusedvae_autoencoder_kl", help="output folder")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--logvar-lr", type=float, default=1e-2, help="learning rate of the loss's logvar")
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="latent diffusion's kl_weight")
    parser.add_argument("--logvar-init", type=float, default=0.0, help="latent diffusion's logvar_init")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return parser.parse_args(argv)


@torch.no_grad()
def evaluate(vae, loss_fn, test: torch.Tensor) -> dict:
    """The objective and plain metrics on the test patches, decoding the posterior mean."""
    vae.eval()
    images = to_model_range(test)
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.mode()).sample
    out = loss_fn(images, recon, posterior.mean, posterior.logvar)
    mae = torch.abs(recon - images).mean().item()
    mse_unit = ((to_unit_range(recon) - to_unit_range(images)) ** 2).mean().item()
    vae.train()
    return {
        "nll_per_sample": out.nll.item(),
        "kl_per_sample": out.kl.item(),
        "l1_per_pixel": mae,
        "psnr_db": 10 * math.log10(1.0 / mse_unit),
        "logvar": loss_fn.logvar.item(),
        "log_mean_abs_error": math.log(mae),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train, test = load_photo_patches(args.seed, patch=32)

    vae = small_autoencoder_kl()
    loss_fn = fusedvae.AutoencoderKLLoss(kl_weight=args.kl_weight, logvar_init=args.logvar_init)
    # The loss's logvar is learned with the autoencoder (latent diffusion's released
    # training leaves it out of the optimizer, fixing it at logvar_init), at a larger
    # rate: one scalar, whose optimum, log mean |x - x̂|, moves as the model learns.
    optimizer = torch.optim.Adam(
        [{"params": vae.parameters()}, {"params": loss_fn.parameters(), "lr": args.logvar_lr}], lr=args.lr
    )
    generator = torch.Generator().manual_seed(args.seed)

    steps = range(1, args.steps + 1)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(steps, desc="AutoencoderKL", unit="step", file=sys.stdout)
        steps = bar
    log_every = max(1, args.steps // 10)
    start = time.perf_counter()
    for step in steps:
        index = torch.randint(0, train.shape[0], (args.batch_size,), generator=generator)
        images = to_model_range(train[index])
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)

        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        out = loss_fn(images, recon, posterior.mean, posterior.logvar)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

        if bar is not None and (step % 10 == 0 or step == args.steps):
            bar.set_postfix(nll=f"{out.nll.item():.0f}", kl=f"{out.kl.item():.0f}", logvar=f"{loss_fn.logvar.item():.2f}")
        if bar is None and (step % log_every == 0 or step == args.steps):
            print(f"step {step}/{args.steps}: nll {out.nll.item():.1f}, kl {out.kl.item():.1f}, "
                  f"logvar {loss_fn.logvar.item():.3f}", flush=True)
    seconds = time.perf_counter() - start

    metrics = evaluate(vae, loss_fn, test)
    metrics.update(steps=args.steps, batch_size=args.batch_size, kl_weight=args.kl_weight,
                   train_seconds=round(seconds, 1), test_patches=int(test.shape[0]))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    with torch.no_grad():
        vae.eval()
        # ten test patches from flat to busy: evenly spaced ranks of their pixel spread
        spread = test.float().flatten(1).std(dim=1)
        order = spread.argsort()
        shown = to_model_range(test[order[torch.linspace(0, len(order) - 1, 10).round().long()]])
        recon = vae.decode(vae.encode(shown).latent_dist.mode()).sample
    image_grid(
        [
            ("test patches", to_unit_range(shown)),
            ("reconstructions", to_unit_range(recon)),
            ("|error| x4", (4 * torch.abs(to_unit_range(recon) - to_unit_range(shown))).clamp(0, 1)),
        ],
        os.path.join(args.out, "reconstructions.png"),
        f"diffusers.AutoencoderKL (f=4, 4x8x8 latent) trained {args.steps} steps with "
        f"fusedvae.AutoencoderKLLoss (kl_weight={args.kl_weight:g}): test PSNR {metrics['psnr_db']:.1f} dB",
    )
    print(f"test: L1/pixel {metrics['l1_per_pixel']:.4f}, PSNR {metrics['psnr_db']:.2f} dB, "
          f"KL/sample {metrics['kl_per_sample']:.1f} nats; learned logvar {metrics['logvar']:.3f} "
          f"(log of the mean |error|: {metrics['log_mean_abs_error']:.3f}); "
          f"{seconds:.0f} s of training; wrote {args.out}/reconstructions.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
