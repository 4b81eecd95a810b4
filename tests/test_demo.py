"""``python -m fusedvae demo``: its helpers, and one end-to-end ``--quick`` run.

The demo needs the ``demo`` extra (matplotlib, scikit-learn, tqdm); the end-to-end
test is skipped without it. The helpers are checked against independent
definitions: the continuous-Bernoulli mean against numerical integration of the
density (mpmath), the eager loss against ``fusedvae.reference``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fusedvae
from fusedvae import demo, diagnostics, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- losses


def _batch(target_dtype=torch.float32, shape=(6, 1, 16, 16), j=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    recon = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).float().requires_grad_()
    if target_dtype == torch.uint8:
        target = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        target = torch.rand(shape, generator=g)
    mu = torch.randn(shape[0], j, generator=g).requires_grad_()
    logvar = (0.5 * torch.randn(shape[0], j, generator=g)).requires_grad_()
    return recon, target, mu, logvar


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_eager_loss_equals_fused_and_reference(target_dtype, beta):
    recon, target, mu, logvar = _batch(target_dtype)
    eager = demo.eager_loss(recon, target, mu, logvar, beta=beta)
    fused = fusedvae.vae_loss(recon, target, mu, logvar, beta=beta).loss
    ref = reference.vae_loss(recon, target, mu, logvar, beta=beta).loss
    torch.testing.assert_close(eager, fused, rtol=1e-5, atol=0)
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=0)
    ge = torch.autograd.grad(eager, (recon, mu, logvar))
    gf = torch.autograd.grad(fused, (recon, mu, logvar))
    for a, b in zip(ge, gf):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_classic_mistake_is_mean_reduction_with_beta_J():
    recon, target, mu, logvar = _batch()
    n, j = recon[0].numel(), mu.shape[1]
    beta_mean, beta_batchmean = demo.mistake_equivalent_beta(j, n)
    assert (beta_mean, beta_batchmean) == (j, n)
    user = demo.classic_mistake_loss(recon, target, mu, logvar)
    fused = fusedvae.vae_loss(recon, target, mu, logvar, reduction="mean", beta=beta_mean).loss
    as_elbo = fusedvae.vae_loss(recon, target, mu, logvar, reduction="batchmean", beta=beta_batchmean).loss / n
    torch.testing.assert_close(user, fused, rtol=1e-6, atol=0)
    torch.testing.assert_close(user, as_elbo, rtol=1e-6, atol=0)


def test_kl_per_dim_and_active_units():
    recon, target, mu, logvar = _batch()
    kl = diagnostics.kl_per_dim(mu, logvar)
    torch.testing.assert_close(kl.sum(1), fusedvae.vae_loss(recon, target, mu, logvar).kl, rtol=1e-5, atol=1e-6)
    m = torch.zeros(100, 3)
    m[:, 0] = torch.linspace(-1, 1, 100)  # variance ~0.34: active
    m[:, 1] = 0.05 * torch.linspace(-1, 1, 100)  # variance ~8.5e-4: inactive
    active_count, var = diagnostics.active_units(m)
    active = var > 0.01
    assert active_count == 1
    assert active.tolist() == [True, False, False]
    assert var[2].item() == 0.0


def test_model_shapes():
    for c, j in ((1, 16), (3, 32)):
        model = demo.ConvVAE(c, j)
        x = torch.randint(0, 256, (5, c, 16, 16), dtype=torch.uint8)
        out, mu, logvar = model(x, torch.zeros(5, j))
        assert out.shape == x.shape and mu.shape == logvar.shape == (5, j)


# ----------------------------------------------------------------- end to end


def test_demo_quick_writes_every_file(tmp_path):
    for mod in ("matplotlib", "sklearn", "tqdm"):
        pytest.importorskip(mod)
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fusedvae", "demo", "--quick", "--no-progress", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in demo.OUTPUT_FILES:
        path = out / name
        assert path.is_file(), name
        assert path.stat().st_size > 0, name
    report = (out / "report.md").read_text()
    linked = set(re.findall(r"\]\(([^)]+\.png)\)", report))
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == set(demo.PICTURES)
    assert pngs <= linked, pngs - linked
    for name in demo.PICTURES:
        assert re.search(r"!\[[^\]]*\]\(" + re.escape(name) + r"\)", report), f"{name} is not shown in report.md"
        with open(out / name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
