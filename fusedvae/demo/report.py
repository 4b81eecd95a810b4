"""``report.md``: every experiment's numbers, in words and tables, with its pictures."""
from __future__ import annotations

import math
import os
from typing import List, Sequence

import torch

from .experiments import LIKELIHOODS

__all__ = ["write_report"]


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
    L.append("![failure vs fix](fig1_failure_vs_fix.png)\n")
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
            "c": f"mean, β={f['normalized_beta']:g}", "c_eps": "(c) with Adam ε/N"}
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
