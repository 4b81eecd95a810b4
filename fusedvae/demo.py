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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fusedvae
from .bench import eager_loss
from .diagnostics import active_units, kl_per_dim
from .functional import continuous_bernoulli_mean

__all__ = [
    "ConvVAE",
    "LIKELIHOODS",
    "add_arguments",
    "classic_mistake_loss",
    "load_digits_data",
    "load_photo_patches",
    "main",
    "mistake_equivalent_beta",
    "run_demo",
]

LIKELIHOODS = ("bernoulli", "cbernoulli", "gaussian")
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x(E_q[z_j | x]) > 0.01


# --------------------------------------------------------------------------- math helpers


def classic_mistake_loss(recon_logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """What users often write: per-element mean BCE plus the KL summed over latent dims.

    ``F.binary_cross_entropy_with_logits(x, t, reduction="mean") + kl.sum(1).mean()``.
    Equals ``fusedvae.vae_loss(..., reduction="mean", beta=J)`` (see
    :func:`mistake_equivalent_beta`), i.e. ``1/N`` times the per-sample-sum objective
    with β = N.
    """
    if target.dtype == torch.uint8:
        target = target.to(recon_logits.dtype) / 255
    bce = F.binary_cross_entropy_with_logits(recon_logits, target, reduction="mean")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return bce + kl.mean()


def mistake_equivalent_beta(latent_dim: int, input_dim: int) -> Tuple[float, float]:
    r"""The β's that the per-element-mean mistake amounts to.

    The mistake is :math:`\frac1B\sum_b(\text{rec}_b/N + \text{kl}_b)`. ``reduction="mean"``
    computes :math:`\frac1B\sum_b(\text{rec}_b/N + \beta\,\text{kl}_b/J)`, so the
    mistake is ``reduction="mean"`` with β = J; multiplied by N it is the
    per-sample-sum objective (``"batchmean"``) with β = N.

    Returns:
        ``(beta_for_mean_reduction, beta_for_batchmean) = (J, N)``.
    """
    return float(latent_dim), float(input_dim)


# --------------------------------------------------------------------------- data


def load_digits_data(seed: int, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], upsampled to 16x16: ``(train, test)`` float32 [B,1,16,16]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return _split(images, seed, test_fraction)


def load_photo_patches(seed: int, patch: int = 16, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """Non-overlapping RGB patches of scikit-learn's two sample photographs: uint8 ``[B,3,p,p]``."""
    from sklearn.datasets import load_sample_images

    patches = []
    for img in load_sample_images().images:
        t = torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()  # [3, H, W] uint8
        _, h, w = t.shape
        t = t[:, : h - h % patch, : w - w % patch]
        p = t.unfold(1, patch, patch).unfold(2, patch, patch)  # [3, h/p, w/p, p, p]
        patches.append(p.permute(1, 2, 0, 3, 4).reshape(-1, 3, patch, patch))
    return _split(torch.cat(patches).contiguous(), seed, test_fraction)


def _split(data: Tensor, seed: int, test_fraction: float) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(data.shape[0], generator=g)
    n_test = int(round(test_fraction * data.shape[0]))
    return data[perm[n_test:]].contiguous(), data[perm[:n_test]].contiguous()


def _as_float(x: Tensor) -> Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x


# --------------------------------------------------------------------------- model


class ConvVAE(nn.Module):
    """A small convolutional VAE for ``[B, C, 16, 16]`` images.

    Encoder: two stride-2 convolutions (16 → 8 → 4) and a linear layer to (μ, log σ²).
    Decoder: a linear layer and two stride-2 transposed convolutions back to
    ``[B, C, 16, 16]``: logits for the Bernoulli likelihoods, the mean for the Gaussian.
    """

    def __init__(self, channels: int, latent_dim: int = 16, width: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * 16, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * 16), nn.ReLU(),
            nn.Unflatten(1, (2 * width, 4, 4)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(_as_float(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mu, logvar


def display_mean(out: Tensor, likelihood: str) -> Tensor:
    """What to show as the reconstruction: the mean of p(x|z) (clamped to [0, 1] for the Gaussian)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(out)
    if likelihood == "cbernoulli":
        return continuous_bernoulli_mean(out)
    return out.clamp(0, 1)


# --------------------------------------------------------------------------- training


@dataclass
class RunConfig:
    likelihood: str = "bernoulli"
    beta: float = 1.0
    reduction: str = "batchmean"
    log_scale: object = None
    latent_dim: int = 16
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    adam_eps: float = 1e-8
    seed: int = 0


@dataclass
class TrainResult:
    config: RunConfig
    model: ConvVAE
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0


def train_vae(train: Tensor, cfg: RunConfig, desc: str, progress: bool = True) -> TrainResult:
    """Train a :class:`ConvVAE` with ``fusedvae.vae_loss`` and Adam.

    The model's initial weights, the mini-batches and the reparameterisation noise
    all come from ``cfg.seed``, so two runs with the same seed see the same
    sequence of batches and noise.
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = ConvVAE(train.shape[1], cfg.latent_dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    result = TrainResult(cfg, model)
    order = torch.randperm(train.shape[0], generator=g)
    pos = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, disable=not progress, mininterval=0.5,
               file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        if pos + cfg.batch_size > order.numel():
            order = torch.randperm(train.shape[0], generator=g)
            pos = 0
        x = train[order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        noise = torch.randn(x.shape[0], cfg.latent_dim, generator=g)
        out, mu, logvar = model(x, noise)
        loss = fusedvae.vae_loss(out, x, mu, logvar, likelihood=cfg.likelihood, beta=cfg.beta,
                                 reduction=cfg.reduction, log_scale=cfg.log_scale).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(loss.item())
        if progress and len(result.losses) % 50 == 0:
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}", refresh=False)
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class Evaluation:
    rec: float  # mean over the data of E_q[-log p(x|z)], nats per sample
    kl: float  # mean KL, nats per sample
    kl_dims: Tensor  # [J] mean KL of each latent dim
    mu: Tensor  # [B, J] posterior means
    recon: Tensor  # [B, C, H, W] mean of p(x | z = mu), in [0, 1]
    recon_lambda: Optional[Tensor] = None  # cbernoulli only: sigmoid(logits) (NOT the mean)
    mse: float = 0.0  # per-element MSE of ``recon`` against the data

    @property
    def neg_elbo(self) -> float:
        return self.rec + self.kl


@torch.no_grad()
def evaluate(model: ConvVAE, data: Tensor, likelihood: str, log_scale=None, samples: int = 4,
             seed: int = 1234, target: Optional[Tensor] = None) -> Evaluation:
    """Test-set rate and distortion: E_q[-log p(x|z)] estimated with ``samples`` draws of z.

    ``target`` (default: ``data``) is what the likelihood is evaluated on; the encoder
    always sees ``data``.
    """
    model.eval()
    target = data if target is None else target
    g = torch.Generator().manual_seed(seed)
    mu, logvar = model.encode(data)
    rec = torch.zeros(data.shape[0], dtype=torch.float64)
    for _ in range(samples):
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
        out = model.decode(z)
        rec += fusedvae.vae_loss(out, target, mu, logvar, likelihood=likelihood, reduction="none",
                                 log_scale=log_scale).rec.double()
    rec /= samples
    kl = kl_per_dim(mu, logvar)
    out_mu = model.decode(mu)
    recon = display_mean(out_mu, likelihood).float()
    model.train()
    return Evaluation(
        rec=rec.mean().item(), kl=kl.sum(1).double().mean().item(), kl_dims=kl.double().mean(0),
        mu=mu, recon=recon,
        recon_lambda=torch.sigmoid(out_mu) if likelihood == "cbernoulli" else None,
        mse=(recon - _as_float(data)).pow(2).mean().item(),
    )


@torch.no_grad()
def decoder_mse(model: ConvVAE, data: Tensor, seed: int = 4321) -> float:
    """Per-element MSE of the decoder mean at one posterior sample per image (the σ-VAE σ²)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    mu, logvar = model.encode(data)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
    mse = (model.decode(z) - _as_float(data)).pow(2).mean().item()
    model.train()
    return mse


# --------------------------------------------------------------------------- pictures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mosaic(images: Tensor, pad: int = 1) -> "object":
    """``[n, C, H, W]`` in [0, 1] → one ``[H, n*(W+pad)-pad, C]`` (or 2-D for C=1) numpy row."""
    n, c, h, w = images.shape
    canvas = torch.ones(c, h, n * (w + pad) - pad)
    for i in range(n):
        canvas[:, :, i * (w + pad): i * (w + pad) + w] = images[i].clamp(0, 1)
    return canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()


def image_grid(rows: Sequence[Tuple[str, Tensor]], path: str, title: str) -> None:
    """One labelled row of images per ``(label, [n, C, H, W])``."""
    plt = _plt()
    n, _, h, w = rows[0][1].shape
    fig_w, label_w = 9.0, 1.9
    row_h = (fig_w - label_w - 0.2) * h / (n * (w + 1)) + 0.12
    fig, axes = plt.subplots(len(rows), 1, figsize=(fig_w, row_h * len(rows) + 0.45))
    if len(rows) == 1:
        axes = [axes]
    for ax, (label, imgs) in zip(axes, rows):
        ax.imshow(_mosaic(imgs), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=label_w / fig_w, right=0.99, top=1 - 0.35 / (row_h * len(rows) + 0.45),
                        bottom=0.01, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- experiments


@dataclass
class Settings:
    steps: int
    sweep_betas: Tuple[float, ...]
    lik_steps: int
    timing_steps: int
    eval_samples: int
    n_show: int = 10


QUICK = Settings(steps=300, sweep_betas=(0.1, 1.0, 10.0), lik_steps=300, timing_steps=8, eval_samples=2)
FULL = Settings(steps=3000, sweep_betas=(0.1, 0.3, 1.0, 3.0, 10.0), lik_steps=4000, timing_steps=40,
                eval_samples=8)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def experiment_failure(train, test, st: Settings, seed: int, out: str, progress: bool, res: dict) -> Dict[str, object]:
    """Experiment 1: per-element mean with β=1 on the KL sum vs batchmean vs normalised β."""
    n = int(train[0].numel())
    j = 16
    beta_mean_mistake, beta_eff = mistake_equivalent_beta(j, n)
    beta_norm = fusedvae.normalized_beta(1.0, j, n)
    base = dict(likelihood="bernoulli", latent_dim=j, steps=st.steps, seed=seed)
    runs = {
        "a": train_vae(train, RunConfig(reduction="mean", beta=beta_mean_mistake, **base), "1a mean, beta=J", progress),
        "b": train_vae(train, RunConfig(reduction="batchmean", beta=1.0, **base), "1b batchmean, beta=1", progress),
        "c": train_vae(train, RunConfig(reduction="mean", beta=beta_norm, **base), "1c mean, beta_norm", progress),
        # Control: Adam's eps scaled by 1/N as well, which makes Adam's update exactly invariant.
        "c_eps": train_vae(train, RunConfig(reduction="mean", beta=beta_norm, adam_eps=1e-8 / n, **base),
                           "1c' mean, beta_norm, eps/N", progress),
    }
    evals = {k: evaluate(r.model, test, "bernoulli", samples=st.eval_samples) for k, r in runs.items()}

    # The mistake as users write it equals vae_loss(reduction="mean", beta=J), at some parameters.
    g = torch.Generator().manual_seed(seed + 7)
    xb = test[:32]
    noise = torch.randn(xb.shape[0], j, generator=g)
    model_b = runs["b"].model
    out_b, mu_b, lv_b = model_b(xb, noise)
    user = classic_mistake_loss(out_b, xb, mu_b, lv_b).item()
    fused_a = fusedvae.vae_loss(out_b, xb, mu_b, lv_b, reduction="mean", beta=beta_mean_mistake).loss.item()
    fused_eff = fusedvae.vae_loss(out_b, xb, mu_b, lv_b, reduction="batchmean", beta=beta_eff).loss.item() / n

    # (b) and (c) at the same parameters: loss ratio and gradient ratio.
    def loss_and_grads(reduction, beta):
        model_b.zero_grad(set_to_none=True)
        o, m, lv = model_b(xb, noise)
        loss = fusedvae.vae_loss(o, xb, m, lv, reduction=reduction, beta=beta).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model_b.parameters()])
        model_b.zero_grad(set_to_none=True)
        return loss.item(), grads

    lb, gb = loss_and_grads("batchmean", 1.0)
    lc, gc = loss_and_grads("mean", beta_norm)
    grad_rel = ((gb - n * gc).abs().max() / gb.abs().max()).item()

    # Trajectories: Adam is invariant to a constant scale of the loss (up to its eps).
    curve_b = torch.tensor(runs["b"].losses, dtype=torch.float64)
    curve_c = torch.tensor(runs["c"].losses, dtype=torch.float64) * n
    curve_rel = ((curve_b - curve_c).abs() / curve_b.abs()).max().item()
    recon_diff = (evals["b"].recon - evals["c"].recon).abs().max().item()
    recon_mean_diff = (evals["b"].recon - evals["c"].recon).abs().mean().item()
    param_diff = max((pb - pc).abs().max().item()
                     for pb, pc in zip(runs["b"].model.parameters(), runs["c"].model.parameters()))
    curve_ce = torch.tensor(runs["c_eps"].losses, dtype=torch.float64) * n
    eps_curve_rel = ((curve_b - curve_ce).abs() / curve_b.abs()).max().item()
    eps_recon_diff = (evals["b"].recon - evals["c_eps"].recon).abs().max().item()
    eps_param_diff = max((pb - pc).abs().max().item()
                         for pb, pc in zip(runs["b"].model.parameters(), runs["c_eps"].model.parameters()))

    mean_image = train.mean(0, keepdim=True)
    k = st.n_show
    image_grid(
        [("test images", test[:k]),
         ("(a) BCE mean\n+ KL sum, β=1", evals["a"].recon[:k]),
         ("(b) batchmean\nβ=1", evals["b"].recon[:k]),
         (f"(c) mean,\nβ={beta_norm:g}", evals["c"].recon[:k]),
         ("train mean\nimage", mean_image.expand(k, -1, -1, -1))],
        os.path.join(out, "fig1_failure_vs_fix.png"),
        f"Digits 16x16 (N={n}), J={j}, {st.steps} Adam steps. (a) is batchmean with effective β=N={n}",
    )
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = range(1, len(curve_b) + 1)
    ax[0].plot(steps, curve_b, label="(b) batchmean, β=1", lw=2.5, alpha=0.6)
    ax[0].plot(steps, curve_c, label=f"(c) mean, β_norm={beta_norm:g}, × N", lw=1, ls="--", color="k")
    ax[0].plot(steps, torch.tensor(runs["a"].losses) * n, label="(a) mistake, × N", lw=1, color="C3")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss (nats per image)")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=7)
    ax[0].set_title("training curves (c and a rescaled by N)", fontsize=9)
    ax[1].plot(steps, ((curve_b - curve_c).abs() / curve_b).clamp_min(1e-17), lw=1, label="Adam eps = 1e-8 (default)")
    ax[1].plot(steps, ((curve_b - curve_ce).abs() / curve_b).clamp_min(1e-17), lw=1,
               label="(c) with eps = 1e-8 / N (0 drawn at 1e-17)")
    ax[1].set_yscale("log")
    ax[1].legend(fontsize=7)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("|loss_b − N·loss_c| / loss_b")
    ax[1].set_title("(b) vs (c): relative difference per step", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig1_training_curves.png"), dpi=110)
    plt.close(fig)

    a_out = evals["a"].recon
    res["failure"] = {
        "N": n, "J": j, "mistake_beta_for_mean": beta_mean_mistake, "mistake_beta_for_batchmean": beta_eff,
        "normalized_beta": beta_norm, "steps": st.steps,
        "user_expression_loss": user, "fused_mean_beta_J_loss": fused_a, "fused_batchmean_beta_N_over_N": fused_eff,
        "user_vs_fused_abs_diff": abs(user - fused_a),
        "same_params_loss_b": lb, "same_params_loss_c": lc, "same_params_ratio": lb / lc,
        "same_params_grad_rel_diff": grad_rel,
        "trajectory_max_rel_loss_diff": curve_rel, "max_abs_recon_diff_b_c": recon_diff,
        "mean_abs_recon_diff_b_c": recon_mean_diff, "max_abs_param_diff_b_c": param_diff,
        "eps_scaled_trajectory_max_rel_loss_diff": eps_curve_rel, "eps_scaled_max_abs_recon_diff": eps_recon_diff,
        "eps_scaled_max_abs_param_diff": eps_param_diff,
        "a_output_std_over_test": a_out.std(0).mean().item(),
        "a_mse_to_train_mean_image": (a_out - mean_image).pow(2).mean().item(),
        "train_seconds": {k2: r.seconds for k2, r in runs.items()},
    }
    for key in ("a", "b", "c", "c_eps"):
        e = evals[key]
        res["failure"][key] = {"rec": e.rec, "kl": e.kl, "neg_elbo": e.neg_elbo, "mse": e.mse,
                               "active_units": int(active_units(e.mu, ACTIVE_UNIT_THRESHOLD).count)}
    return {"runs": runs, "evals": evals}


def experiment_sweep(train, test, st: Settings, seed: int, out: str, progress: bool, res: dict,
                     beta1: Tuple[TrainResult, Evaluation]) -> Dict[float, Evaluation]:
    """Experiment 2: β sweep as a rate–distortion curve on the test set."""
    evals: Dict[float, Evaluation] = {}
    seconds = {}
    for beta in st.sweep_betas:
        if beta == 1.0:
            evals[beta] = beta1[1]
            seconds[beta] = beta1[0].seconds
            continue
        r = train_vae(train, RunConfig(beta=beta, steps=st.steps, seed=seed), f"2 beta={beta:g}", progress)
        evals[beta] = evaluate(r.model, test, "bernoulli", samples=st.eval_samples)
        seconds[beta] = r.seconds
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4))
    rates = [evals[b].kl for b in st.sweep_betas]
    dists = [evals[b].rec for b in st.sweep_betas]
    ax.plot(rates, dists, "o-")
    for b, r, d in zip(st.sweep_betas, rates, dists):
        ax.annotate(f"β={b:g}", (r, d), textcoords="offset points", xytext=(6, 4), fontsize=8)
    e1 = evals.get(1.0)
    if e1 is not None:
        xs = torch.linspace(0, max(rates) * 1.05, 50)
        ax.plot(xs, e1.neg_elbo - xs, ls=":", color="grey", lw=1, label="R + D = −ELBO at β=1")
        ax.legend(fontsize=7)
    ax.set_xlabel("rate R = mean KL (nats)")
    ax.set_ylabel("distortion D = mean rec. NLL (nats)")
    ax.set_title("β sweep, digits test set", fontsize=9)
    ax.set_ylim(min(dists) * 0.9, max(dists) * 1.05)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig2_rate_distortion.png"), dpi=110)
    plt.close(fig)
    k = st.n_show
    image_grid([("test images", test[:k])] + [(f"β={b:g}", evals[b].recon[:k]) for b in st.sweep_betas],
               os.path.join(out, "fig2_beta_sweep_recons.png"), "Reconstructions (decoder at z = μ) across the β sweep")
    res["sweep"] = [{"beta": b, "rate": evals[b].kl, "distortion": evals[b].rec, "neg_elbo": evals[b].neg_elbo,
                     "active_units": int(active_units(evals[b].mu, ACTIVE_UNIT_THRESHOLD).count), "train_seconds": seconds[b]}
                    for b in st.sweep_betas]
    return evals


def experiment_kl_dims(evals: Dict[str, Evaluation], out: str, res: dict) -> None:
    """Experiment 3: per-dim KL bars with active units marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(evals), figsize=(4.2 * len(evals), 3.3), squeeze=False)
    res["kl_dims"] = {}
    for ax, (label, e) in zip(axes[0], evals.items()):
        var = active_units(e.mu, ACTIVE_UNIT_THRESHOLD).variances
        active = var > ACTIVE_UNIT_THRESHOLD
        kl = e.kl_dims.numpy()
        colors = ["C0" if a else "lightgrey" for a in active.tolist()]
        ax.bar(range(len(kl)), kl, color=colors, edgecolor="k", lw=0.4)
        for jj, a in enumerate(active.tolist()):
            if a:
                ax.text(jj, kl[jj], "*", ha="center", va="bottom", fontsize=9)
        ax.set_xlabel("latent dim j")
        ax.set_xticks(range(0, len(kl), 2 if len(kl) <= 16 else 4))
        ax.set_ylabel("mean KL_j (nats)")
        ax.set_title(f"{label}: {int(active.sum())}/{len(kl)} active (*)", fontsize=9)
        res["kl_dims"][label] = {"kl_per_dim": [float(v) for v in kl], "var_mu": [float(v) for v in var],
                                 "active": [bool(a) for a in active.tolist()], "n_active": int(active.sum())}
    fig.suptitle(f"Per-dim KL on the digits test set; active = Var_x(E_q[z_j]) > {ACTIVE_UNIT_THRESHOLD}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig3_kl_per_dim.png"), dpi=110)
    plt.close(fig)


def experiment_likelihoods(train, test, likelihoods: Sequence[str], st: Settings, seed: int, out: str,
                           progress: bool, res: dict) -> None:
    """Experiment 4: Bernoulli vs continuous Bernoulli vs σ-VAE Gaussian on photo patches."""
    n = int(train[0].numel())
    j = 32
    g = torch.Generator().manual_seed(seed + 99)
    # Uniform dequantisation of the 8-bit test data for the bits/dim bound: x = (k + u) / 256.
    test_deq = (test.double() + torch.rand(test.shape, generator=g, dtype=torch.float64)).div(256).float()
    k = st.n_show
    rows: List[Tuple[str, Tensor]] = [("test patches", _as_float(test[:k]))]
    res["likelihoods"] = {"N": n, "J": j, "steps": st.lik_steps}
    for lik in likelihoods:
        cfg = RunConfig(likelihood=lik, latent_dim=j, steps=st.lik_steps, seed=seed,
                        log_scale="optimal" if lik == "gaussian" else None)
        r = train_vae(train, cfg, f"4 {lik}", progress)
        eval_scale = None
        if lik == "gaussian":
            # σ-VAE's σ² is the batch MSE; to evaluate a fixed density we use σ² = train MSE.
            eval_scale = 0.5 * math.log(decoder_mse(r.model, train))
        e = evaluate(r.model, test, lik, log_scale=eval_scale, samples=st.eval_samples)
        e_train = evaluate(r.model, train, lik, log_scale=eval_scale, samples=st.eval_samples)
        entry = {"rec": e.rec, "kl": e.kl, "neg_elbo": e.neg_elbo, "mse": e.mse, "train_seconds": r.seconds,
                 "train_neg_elbo": e_train.neg_elbo, "train_mse": e_train.mse,
                 "active_units": int(active_units(e.mu, ACTIVE_UNIT_THRESHOLD).count)}
        if lik == "gaussian":
            entry["log_sigma"] = eval_scale
        if lik in ("cbernoulli", "gaussian"):
            ed = evaluate(r.model, test, lik, log_scale=eval_scale, samples=st.eval_samples, target=test_deq)
            entry["neg_elbo_dequantized"] = ed.neg_elbo
            entry["bits_per_dim"] = (ed.neg_elbo / n + math.log(256)) / math.log(2)
        else:
            entry["bits_per_dim"] = None
        res["likelihoods"][lik] = entry
        if lik == "bernoulli":
            rows.append(("Bernoulli\nsigmoid(logits)", e.recon[:k]))
        elif lik == "cbernoulli":
            rows.append(("cont. Bernoulli\nmean", e.recon[:k]))
            rows.append(("cont. Bernoulli λ\n(wrong: not the mean)", e.recon_lambda[:k]))
            entry["mse_if_lambda_shown"] = (e.recon_lambda - _as_float(test)).pow(2).mean().item()
        else:
            rows.append(("σ-VAE Gaussian\nmean", e.recon[:k]))
    image_grid(rows, os.path.join(out, "fig4_likelihoods.png"),
               f"RGB 16x16 photo patches (uint8 targets), J={j}, {st.lik_steps} steps; decoder at z = μ")


def experiment_timing(datasets: Dict[str, Tensor], st: Settings, seed: int, out: str, res: dict) -> None:
    """Experiment 5: one training step (forward, backward, Adam) with the fused vs the eager loss."""
    res["timing"] = {"threads": torch.get_num_threads(), "steps": st.timing_steps, "cases": []}
    for name, (data, j, batch) in datasets.items():
        torch.manual_seed(seed)
        model = ConvVAE(data.shape[1], j)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = data[:batch]
        noise = torch.randn(x.shape[0], j, generator=torch.Generator().manual_seed(seed))
        fns = {
            "fused": lambda o, t, m, lv: fusedvae.vae_loss(o, t, m, lv).loss,
            "eager": eager_loss,
        }
        # The two losses agree at these parameters before anything is timed.
        with torch.no_grad():
            o, m, lv = model(x, noise)
            lf, le = fns["fused"](o, x, m, lv).item(), fns["eager"](o, x, m, lv).item()
        assert abs(lf - le) <= 1e-4 * abs(le), (lf, le)
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for i in range(st.timing_steps + 2):
            for method in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                o, m, lv = model(x, noise)
                loss = fns[method](o, x, m, lv)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                dt = time.perf_counter() - t0
                if i >= 2:  # the first two rounds are warm-up
                    times[method].append(dt)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        res["timing"]["cases"].append({
            "case": name, "shape": list(x.shape), "target_dtype": str(x.dtype).replace("torch.", ""),
            "latent_dim": j, "fused_ms": med["fused"], "eager_ms": med["eager"],
            "speedup": med["eager"] / med["fused"], "loss_fused": lf, "loss_eager": le,
        })
    plt = _plt()
    cases = res["timing"]["cases"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    xs = range(len(cases))
    ax.bar([i - 0.2 for i in xs], [c["eager_ms"] for c in cases], 0.4, label="eager PyTorch loss")
    ax.bar([i + 0.2 for i in xs], [c["fused_ms"] for c in cases], 0.4, label="fusedvae.vae_loss")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{c['case']}\n{'x'.join(map(str, c['shape']))} {c['target_dtype']}" for c in cases],
                       fontsize=7)
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"forward + backward + Adam, torch threads: {res['timing']['threads']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig5_timing.png"), dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def write_report(res: dict, out: str, pictures: Sequence[str]) -> None:
    f = res["failure"]
    L: List[str] = []
    L.append("# fusedvae demo\n")
    L.append(f"Mode: {'--quick' if res['quick'] else 'full'}, seed {res['seed']}, torch {torch.__version__}, "
             f"torch threads: {torch.get_num_threads()}; total run time {res['total_seconds']:.1f} s.\n")
    L.append("Data (no download): scikit-learn `load_digits()` (8x8, values 0..16 → [0, 1], bilinear upsampling to "
             f"16x16; {res['data']['digits_train']} train / {res['data']['digits_test']} test) and "
             "`load_sample_images()` cut into non-overlapping 16x16 RGB patches kept as uint8 "
             f"({res['data']['patches_train']} train / {res['data']['patches_test']} test). Model: a small conv VAE "
             "(2 stride-2 convs → μ, log σ²; linear + 2 transposed convs → logits or mean), Adam (lr 2e-3, batch 64), "
             "trained with `fusedvae.vae_loss`. Test numbers are means over the test set, "
             "E_q[−log p(x|z)] estimated with "
             f"{res['eval_samples']} samples of z per image; pictures decode z = μ.\n")

    L.append("## 1. The classic failure and its fix\n")
    L.append(f"![failure vs fix](fig1_failure_vs_fix.png)\n")
    L.append(
        "(a) is what users write: `F.binary_cross_entropy_with_logits(x, t, reduction=\"mean\") + kl.sum(1).mean()`, "
        "i.e. (1/B)·Σ_b (rec_b/N + kl_b). `reduction=\"mean\"` computes (1/B)·Σ_b (rec_b/N + β·kl_b/J), so (a) is "
        f"`vae_loss(reduction=\"mean\", beta=J)` with J = {f['J']}; times N it is the ELBO objective "
        f"(`\"batchmean\"`) with **β = N = {f['N']}**. "
        f"Checked on a test batch: user expression {f['user_expression_loss']:.6g}, "
        f"`vae_loss(mean, beta={f['J']})` {f['fused_mean_beta_J_loss']:.6g}, "
        f"`vae_loss(batchmean, beta={f['N']})/N` {f['fused_batchmean_beta_N_over_N']:.6g} "
        f"(|difference| {f['user_vs_fused_abs_diff']:.2e}).\n")
    L.append("(b) the fix: `reduction=\"batchmean\", beta=1` (the ELBO). (c) `reduction=\"mean\", "
             f"beta=normalized_beta(1, J, N)` = {f['normalized_beta']:g}.\n")
    L.append("| run | objective | test rec. NLL (nats) | test KL (nats) | test −ELBO (nats) | MSE | active units |")
    L.append("|---|---|---|---|---|---|---|")
    desc = {"a": f"mean, β=J={f['J']} (≡ batchmean β={f['N']})", "b": "batchmean, β=1",
            "c": f"mean, β={f['normalized_beta']:g}", "c_eps": f"(c) with Adam ε/N"}
    for key in ("a", "b", "c", "c_eps"):
        e = f[key]
        L.append(f"| ({key.replace('_eps', chr(39))}) | {desc[key]} | {e['rec']:.2f} | {e['kl']:.3f} | {e['neg_elbo']:.2f} | "
                 f"{e['mse']:.4f} | {e['active_units']}/{f['J']} |")
    L.append("")
    collapsed = f["a"]["active_units"] == 0 and f["a_output_std_over_test"] < 1e-2
    L.append(f"(a)'s reconstructions: standard deviation over the test set, averaged over pixels, "
             f"{f['a_output_std_over_test']:.2e}; MSE to the training-set mean image "
             f"{f['a_mse_to_train_mean_image']:.2e}; test KL {f['a']['kl']:.2e} nats. "
             + ("They do not depend on the input: the decoder outputs the mean image (posterior collapse).\n"
                if collapsed else "In this run (a) did not collapse completely; see the picture.\n"))
    L.append("**(b) and (c) are the same objective.** At the same parameters and batch: "
             f"loss_b = {f['same_params_loss_b']:.8g}, loss_c = {f['same_params_loss_c']:.8g}, "
             f"loss_b / loss_c = {f['same_params_ratio']:.10g} (N = {f['N']}); "
             f"max |grad_b − N·grad_c| / max |grad_b| = {f['same_params_grad_rel_diff']:.2e}. "
             "Adam is invariant to a constant scale of the loss (up to its ε = 1e-8), so with the same seed the two "
             f"trainings follow the same trajectory: max relative difference of loss_b and N·loss_c over "
             f"{f['steps']} steps {f['trajectory_max_rel_loss_diff']:.2e}; decoded test images (probabilities "
             f"in [0, 1]) differ by at most {f['max_abs_recon_diff_b_c']:.2e} (mean "
             f"{f['mean_abs_recon_diff_b_c']:.2e}); final parameters by at most "
             f"{f['max_abs_param_diff_b_c']:.2e}. "
             "The gradients are exactly N times apart (N is a power of two, so the scaling is exact in floating "
             "point); the only thing that is not scale-invariant is Adam's ε, which the loss of (c), N times "
             "smaller, feels N times more, and training amplifies these small differences step after step. "
             "Control (c'): the same as (c) with Adam's ε divided by N too: max relative loss difference "
             f"{f['eps_scaled_trajectory_max_rel_loss_diff']:.2e}, max image difference "
             f"{f['eps_scaled_max_abs_recon_diff']:.2e}, max parameter difference "
             f"{f['eps_scaled_max_abs_param_diff']:.2e}.\n")
    L.append("![training curves](fig1_training_curves.png)\n")

    L.append("## 2. β sweep: rate and distortion (digits test set)\n")
    L.append("![rate-distortion](fig2_rate_distortion.png)\n")
    L.append("![sweep reconstructions](fig2_beta_sweep_recons.png)\n")
    L.append("| β | rate R (nats) | distortion D (nats) | R + D | active units |")
    L.append("|---|---|---|---|---|")
    for s in res["sweep"]:
        L.append(f"| {s['beta']:g} | {s['rate']:.2f} | {s['distortion']:.2f} | {s['neg_elbo']:.2f} | "
                 f"{s['active_units']}/{f['J']} |")
    L.append("")
    L.append("Distortion is the Bernoulli NLL of grey-level targets; it cannot reach 0 (its floor is the binary "
             "entropy of the grey levels), only the differences between runs matter.\n")

    L.append("## 3. KL per latent dimension and active units\n")
    L.append("![per-dim KL](fig3_kl_per_dim.png)\n")
    L.append("A unit is active when the variance over the test set of its posterior mean E_q[z_j|x] exceeds 0.01 "
             "(Burda et al., 2016).\n")
    for label, d in res["kl_dims"].items():
        kls = ", ".join(f"{v:.2f}" for v in d["kl_per_dim"])
        L.append(f"- {label}: {d['n_active']}/{len(d['kl_per_dim'])} active; KL per dim (nats): {kls}")
    L.append("")

    lk = res["likelihoods"]
    L.append("## 4. Bernoulli vs continuous Bernoulli vs σ-VAE Gaussian (photo patches)\n")
    L.append("![likelihoods](fig4_likelihoods.png)\n")
    L.append("Shown: Bernoulli → sigmoid(logits); continuous Bernoulli → the mean of the CB, "
             "λ/(2λ−1) + 1/(2·atanh(1−2λ)) = 1/(1−e^{−η}) − 1/η (1/2 at λ = 1/2, computed stably); "
             "its λ = sigmoid(η) row shows the known mistake of displaying λ, which is not the mean and "
             "exaggerates contrast; Gaussian → the mean. "
             "σ-VAE trains with `log_scale=\"optimal\"` (σ² = batch MSE); the test density uses the fixed σ² = MSE "
             "on the training set.\n")
    L.append("Bits/dim convention: the test images are dequantised, x = (k + u)/256 with u ~ U(0, 1), and "
             "bits/dim = (−ELBO/N + ln 256)/ln 2, with −ELBO the negative ELBO in nats of the density on [0, 1] "
             f"(N = {lk['N']}). This is an upper bound on the NLL of the 8-bit data (Theis et al., 2016) and is "
             "comparable between the two models that are densities on continuous x (continuous Bernoulli on [0, 1], "
             "Gaussian on ℝ). The Bernoulli 'NLL' of a grey-level target is not a normalised density, so it has no "
             "bits/dim; its BCE value is reported for completeness only. (Models are trained on k/255, "
             "as uint8 targets; the −ELBO columns without dequantisation are evaluated on k/255.)\n")
    L.append("| likelihood | test rec. NLL (nats) | test KL (nats) | test −ELBO (nats) | train −ELBO (nats) | "
             "test bits/dim | test MSE of shown mean | train MSE | active units | train s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for lik in LIKELIHOODS:
        if lik not in lk:
            continue
        e = lk[lik]
        bpd = "n/a" if e["bits_per_dim"] is None else f"{e['bits_per_dim']:.3f}"
        L.append(f"| {lik} | {e['rec']:.1f} | {e['kl']:.2f} | {e['neg_elbo']:.1f} | {e['train_neg_elbo']:.1f} | "
                 f"{bpd} | {e['mse']:.5f} | {e['train_mse']:.5f} | {e['active_units']}/{lk['J']} | "
                 f"{e['train_seconds']:.1f} |")
    L.append("")
    if "cbernoulli" in lk:
        L.append(f"Showing λ instead of the CB mean would give an MSE of {lk['cbernoulli']['mse_if_lambda_shown']:.5f} "
                 f"instead of {lk['cbernoulli']['mse']:.5f}.")
    if "gaussian" in lk:
        g = lk["gaussian"]
        L.append(f"σ-VAE: log σ = {g['log_sigma']:.3f} (σ = {math.exp(g['log_sigma']):.4f}, from the training set; "
                 f"the test MSE of the mean at z = μ is {g['mse']:.5f}, i.e. σ ≈ {math.sqrt(g['mse']):.4f}). "
                 "One σ for every pixel is a poor density for patches that mix flat sky with texture, and a σ fitted "
                 "on training data that the model fits better than the test data makes the test NLL worse still; "
                 "compare the train and test −ELBO columns.")
    L.append("")

    t = res["timing"]
    L.append("## 5. Time of one training step\n")
    L.append("![timing](fig5_timing.png)\n")
    L.append(f"Forward, backward and Adam step of the demo's model on one batch, with `fusedvae.vae_loss` vs the "
             "same loss in eager PyTorch (`binary_cross_entropy_with_logits` summed per sample + closed-form KL), "
             f"median of {t['steps']} steps each, interleaved, torch threads: {t['threads']}, on a shared machine.\n")
    L.append("| case | batch shape | target | eager ms | fused ms | eager / fused |")
    L.append("|---|---|---|---|---|---|")
    for c in t["cases"]:
        L.append(f"| {c['case']} | {'x'.join(map(str, c['shape']))} | {c['target_dtype']} | {c['eager_ms']:.2f} | "
                 f"{c['fused_ms']:.2f} | {c['speedup']:.2f} |")
    L.append("")
    L.append("The loss is a small part of a step for a model this size; `python -m fusedvae bench` times the loss "
             "alone.\n")
    L.append("## Files\n")
    for p in pictures:
        L.append(f"- [{p}]({p})")
    L.append("- [results.json](results.json): every number above")
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write("\n".join(L) + "\n")


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


if __name__ == "__main__":
    sys.exit(main())
