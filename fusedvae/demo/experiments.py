"""The demo's five experiments; each trains, evaluates, draws its pictures and records its numbers in ``res``."""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import normalized_beta, vae_loss
from ..bench import eager_loss
from ..diagnostics import active_units
from .data import _as_float
from .evaluation import Evaluation, decoder_mse, evaluate
from .losses import classic_mistake_loss, mistake_equivalent_beta
from .models import ConvVAE
from .plots import _plt, image_grid
from .training import RunConfig, TrainResult, train_vae

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "FULL",
    "LIKELIHOODS",
    "QUICK",
    "Settings",
    "experiment_failure",
    "experiment_kl_dims",
    "experiment_likelihoods",
    "experiment_sweep",
    "experiment_timing",
]

LIKELIHOODS = ("bernoulli", "cbernoulli", "gaussian")
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x(E_q[z_j | x]) > 0.01


@dataclass
class Settings:
    """Training steps, β sweep and evaluation samples of a run of the demo (:data:`QUICK` or :data:`FULL`)."""

    steps: int
    sweep_betas: Tuple[float, ...]
    lik_steps: int
    timing_steps: int
    eval_samples: int
    n_show: int = 10


QUICK = Settings(steps=300, sweep_betas=(0.1, 1.0, 10.0), lik_steps=300, timing_steps=8, eval_samples=2)
FULL = Settings(steps=3000, sweep_betas=(0.1, 0.3, 1.0, 3.0, 10.0), lik_steps=4000, timing_steps=40,
                eval_samples=8)


def experiment_failure(train, test, st: Settings, seed: int, out: str, progress: bool, res: dict) -> Dict[str, object]:
    """Experiment 1: per-element mean with β=1 on the KL sum vs batchmean vs normalised β."""
    n = int(train[0].numel())
    j = 16
    beta_mean_mistake, beta_eff = mistake_equivalent_beta(j, n)
    beta_norm = normalized_beta(1.0, j, n)
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
    fused_a = vae_loss(out_b, xb, mu_b, lv_b, reduction="mean", beta=beta_mean_mistake).loss.item()
    fused_eff = vae_loss(out_b, xb, mu_b, lv_b, reduction="batchmean", beta=beta_eff).loss.item() / n

    # (b) and (c) at the same parameters: loss ratio and gradient ratio.
    def loss_and_grads(reduction, beta):
        model_b.zero_grad(set_to_none=True)
        o, m, lv = model_b(xb, noise)
        loss = vae_loss(o, xb, m, lv, reduction=reduction, beta=beta).loss
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
            "fused": lambda o, t, m, lv: vae_loss(o, t, m, lv).loss,
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
