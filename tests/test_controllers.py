"""fusedvae.controllers (GECO, ControlVAE) on synthetic signals.

The expected trajectories are the papers' update rules written out here in
Python floats; the modules must match them, stay in their bounds, move in the
right direction, and give the gradients the objectives define.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedvae
from fusedvae import VAELossOutput
from fusedvae.controllers import GECO, ControlVAE
from helpers import no_host_sync

F64 = torch.float64


def _out(rec, kl, dtype=F64, requires_grad=False):
    rec = torch.as_tensor(rec, dtype=dtype).requires_grad_(requires_grad)
    kl = torch.as_tensor(kl, dtype=dtype).requires_grad_(requires_grad)
    return VAELossOutput(loss=(rec + kl).mean(), rec=rec, kl=kl)


def _rec_batches(center, n, batch=4, noise=1.0, seed=0):
    rng = random.Random(seed)
    return [[center + rng.uniform(-noise, noise) for _ in range(batch)] for _ in range(n)]


# ---------------------------------------------------------------- GECO ---


def _host_reads(counter):
    """Nodes of the captured graphs that read a tensor value on the host (a sync on CUDA)."""
    names = ("item", "tolist", "_local_scalar_dense")
    return [n for g in counter.graphs for n in g.graph.nodes if any(k in str(n.target) for k in names)]


def _geco_reference(batches, kappa, alpha, step_size, lam, lam_min, lam_max):
    """Rezende & Viola (2018), Algorithm 1, in floats: λ used at each step and after it."""
    used, after, c_ma = [], [], None
    for rec in batches:
        c = sum(rec) / len(rec) - kappa
        c_ma = c if c_ma is None else alpha * c_ma + (1 - alpha) * c
        used.append(lam)
        lam = min(max(lam * math.exp(step_size * c_ma), lam_min), lam_max)
        after.append(lam)
    return used, after


@pytest.mark.parametrize("above", [True, False], ids=["rec-above-kappa", "rec-below-kappa"])
def test_geco_lambda_direction_bounds_and_formula(above):
    kappa = 50.0
    batches = _rec_batches(kappa + (4.0 if above else -4.0), 300, noise=3.0, seed=1)
    kw = dict(alpha=0.9, step_size=0.05, lambda_init=1.0, lambda_min=1e-3, lambda_max=1e3)
    geco = GECO(kappa, **kw)
    lambdas = []
    for rec in batches:
        geco.loss(_out(rec, [1.0] * 4))
        lambdas.append(geco.lambda_.item())
    _, expected = _geco_reference(batches, kappa, kw["alpha"], kw["step_size"], 1.0, 1e-3, 1e3)
    assert lambdas == pytest.approx(expected, rel=1e-12)
    diffs = [b - a for a, b in zip([1.0] + lambdas, lambdas)]
    bound = 1e3 if above else 1e-3
    if above:
        assert all(d >= 0 for d in diffs) and all(lam <= 1e3 for lam in lambdas)
    else:
        assert all(d <= 0 for d in diffs) and all(lam >= 1e-3 for lam in lambdas)
    # Strictly monotone until the clamp, then held at it.
    first = next(i for i, lam in enumerate(lambdas) if lam == bound)
    assert all(abs(d) > 0 for d in diffs[:first]) and 5 < first < 250
    assert all(lam == bound for lam in lambdas[first:])
    assert geco.num_updates.item() == 300


def test_geco_loss_value_uses_lambda_before_update_and_gradients():
    kappa, batch = 10.0, 5
    geco = GECO(kappa, alpha=0.5, step_size=0.1)
    for rec in _rec_batches(kappa + 2.0, 8, batch=batch, seed=2):  # move λ away from 1
        geco.loss(_out(rec, [0.5] * batch))
    lam = geco.lambda_.item()
    assert lam > 2.0
    rec_vals, kl_vals = [9.0, 13.0, 12.5, 11.0, 14.0], [2.0, 1.0, 0.5, 3.0, 4.0]
    out = _out(rec_vals, kl_vals, requires_grad=True)
    loss = geco.loss(out)
    assert geco.lambda_.item() != lam  # updated after this loss was formed
    assert loss.item() == pytest.approx(sum(kl_vals) / batch + lam * (sum(rec_vals) / batch - kappa), rel=1e-13)
    loss.backward()
    torch.testing.assert_close(out.rec.grad, torch.full((batch,), lam / batch, dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close(out.kl.grad, torch.full((batch,), 1.0 / batch, dtype=F64), rtol=1e-13, atol=0)


def test_geco_through_vae_loss_matches_reference_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, generator=g, dtype=F64)
    t = torch.rand(3, 2, 4, generator=g, dtype=F64)
    mu = torch.randn(3, 5, generator=g, dtype=F64)
    lv = torch.randn(3, 5, generator=g, dtype=F64)
    geco = GECO(kappa=3.0, lambda_init=2.5)
    leaves = [v.clone().requires_grad_() for v in (x, mu, lv)]
    geco.loss(fusedvae.vae_loss(leaves[0], t, leaves[1], leaves[2], beta=0.3)).backward()
    ref_leaves = [v.clone().requires_grad_() for v in (x, mu, lv)]
    ref = fusedvae.reference.vae_loss(ref_leaves[0], t, ref_leaves[1], ref_leaves[2])
    (ref.kl.mean() + 2.5 * (ref.rec.mean() - 3.0)).backward()
    for got, exp in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-10, atol=1e-12)


def test_geco_moving_average_starts_at_first_constraint_and_eval_freezes():
    geco = GECO(kappa=1.0, alpha=0.99, step_size=1e-3)
    geco.loss(_out([4.0, 6.0], [0.0, 0.0]))
    assert geco.constraint_ma.item() == 4.0  # C_1 itself, not 0.99 * 0 + 0.01 * 4
    assert geco.lambda_.item() == pytest.approx(math.exp(4e-3), rel=1e-15)
    geco.loss(_out([2.0, 2.0], [0.0, 0.0]))
    assert geco.constraint_ma.item() == pytest.approx(0.99 * 4.0 + 0.01 * 1.0, rel=1e-15)
    state = {k: v.clone() for k, v in geco.state_dict().items()}
    geco.eval()
    loss = geco.loss(_out([9.0, 9.0], [1.0, 1.0]))
    assert loss.item() == pytest.approx(1.0 + state["lambda_"].item() * 8.0, rel=1e-15)
    for k, v in geco.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_geco_state_follows_inputs_and_round_trips():
    geco = GECO(kappa=2.0, step_size=0.01)
    assert geco.lambda_.dtype == torch.float32
    geco.loss(_out([3.0, 5.0], [1.0, 1.0], dtype=F64))
    assert geco.lambda_.dtype == F64 and geco.constraint_ma.dtype == F64
    assert geco.num_updates.dtype == torch.int64
    clone = GECO(kappa=2.0, step_size=0.01).to(F64)  # load_state_dict copies into the buffers' dtype
    clone.load_state_dict(geco.state_dict())
    for rec in ([4.0, 4.0], [1.0, 2.0]):
        a, b = geco.loss(_out(rec, [0.0, 0.0])), clone.loss(_out(rec, [0.0, 0.0]))
        assert a.item() == b.item()
    assert torch.equal(geco.lambda_, clone.lambda_)
    geco.to(torch.float32)
    assert geco.lambda_.dtype == torch.float32
    geco.loss(_out([1.0], [1.0], dtype=torch.float32))
    assert geco.lambda_.dtype == torch.float32


def test_geco_compiles_without_graph_break_or_recompile():
    torch._dynamo.reset()
    batches = _rec_batches(7.0, 6, seed=4)
    eager, compiled_geco = GECO(kappa=5.0, step_size=0.05), GECO(kappa=5.0, step_size=0.05)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(
        lambda rec, kl: compiled_geco.loss(VAELossOutput(rec.sum(), rec, kl)), fullgraph=True, backend=counter
    )
    for rec in batches:
        rec_t = torch.tensor(rec)
        a = eager.loss(_out(rec_t, torch.ones(4), dtype=torch.float32))
        b = compiled(rec_t, torch.ones(4))
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(compiled_geco.lambda_, eager.lambda_)
    assert compiled_geco.num_updates.item() == 6
    assert counter.frame_count == 1 and _host_reads(counter) == []


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(kappa=float("nan")), "kappa"),
        (dict(kappa=1.0, alpha=1.0), "alpha"),
        (dict(kappa=1.0, alpha=-0.1), "alpha"),
        (dict(kappa=1.0, step_size=0.0), "step_size"),
        (dict(kappa=1.0, lambda_min=0.0), "lambda_min"),
        (dict(kappa=1.0, lambda_min=2.0, lambda_max=1.0), "lambda_max"),
        (dict(kappa=1.0, lambda_init=1e7), "lambda_init"),
        (dict(kappa=1.0, lambda_init=-1.0), "lambda_init"),
    ],
)
def test_geco_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        GECO(**kwargs)


def test_geco_rejects_non_output():
    with pytest.raises(TypeError, match="VAELossOutput"):
        GECO(1.0).loss(torch.zeros(3))


# ---------------------------------------------------------- ControlVAE ---


def _pi_reference(kls, target, kp, ki, beta_min, beta_max, anti_windup=True):
    """Shao et al. (2020), Algorithm 1, in floats: β(t) and I(t) after each step.

    With anti_windup, a step of the integral that pushes the unclamped β past a
    bound stops at that bound (and is skipped when β is past it already); without,
    the integral always accumulates.
    """
    integral, betas, integrals = 0.0, [], []
    for kl in kls:
        e = target - kl
        p = kp / (1.0 + math.exp(e)) if e < 700 else 0.0
        step = -ki * e
        new = integral + step
        if anti_windup and step > 0:
            new = max(integral, min(new, beta_max - beta_min - p))
        elif anti_windup and step < 0:
            new = min(integral, max(new, -p))
        integral = new
        betas.append(min(max(p + integral + beta_min, beta_min), beta_max))
        integrals.append(integral)
    return betas, integrals


def _run(ctrl, kls, dtype=F64):
    betas = []
    for kl in kls:
        betas.append(ctrl.update(torch.tensor([kl - 0.5, kl + 0.5], dtype=dtype)).item())
    return betas


def test_control_vae_unsaturated_is_the_papers_pi_law():
    # Within the bounds: β(t) = Kp / (1 + exp(e(t))) - Ki Σ_{j<=t} e(j) + β_min, in closed form.
    rng = random.Random(5)
    target, kp, ki, bmin = 20.0, 0.05, 1e-3, 0.3
    kls = [target + rng.uniform(-2.0, 2.0) for _ in range(300)]
    ctrl = ControlVAE(target, Kp=kp, Ki=ki, beta_min=bmin, beta_max=0.9)
    got = torch.tensor(_run(ctrl, kls), dtype=F64)
    e = target - torch.tensor(kls, dtype=F64)
    expected = kp / (1 + torch.exp(e)) - ki * torch.cumsum(e, 0) + bmin
    assert bmin < expected.min() and expected.max() < 0.9  # really unsaturated
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert ctrl.integral.item() == pytest.approx(-ki * e.sum().item(), rel=1e-12)


def test_control_vae_moves_beta_in_the_right_direction():
    target = 30.0
    ctrl = ControlVAE(target, Ki=1e-3, beta_min=0.05, beta_max=0.8)
    assert ctrl.beta.item() == pytest.approx(0.05)  # starts at beta_min
    up = _run(ctrl, [target + 20.0] * 100)  # KL above target: β rises to beta_max
    assert all(b >= a for a, b in zip([0.05] + up, up)) and up[-1] == pytest.approx(0.8)
    assert up[0] < 0.1 and up[30] < 0.8
    down = _run(ctrl, [target - 20.0] * 100)  # KL below target: β falls to beta_min
    assert all(b <= a for a, b in zip(up[-1:] + down, down)) and down[-1] == pytest.approx(0.05)
    assert down[0] < 0.8 and down[30] > 0.05


def test_control_vae_noisy_signal_stays_in_bounds_and_matches_reference():
    rng = random.Random(6)
    target, bmin, bmax = 25.0, 0.1, 0.7
    kls = [target + 30.0 * math.sin(2 * math.pi * t / 2000) + rng.gauss(0.0, 5.0) for t in range(10_000)]
    ctrl = ControlVAE(target, Kp=0.01, Ki=1e-3, beta_min=bmin, beta_max=bmax)
    got = _run(ctrl, kls)
    assert min(got) >= bmin and max(got) <= bmax
    assert got.count(bmin) > 100 and got.count(bmax) > 100  # both bounds were reached
    expected, integrals = _pi_reference(kls, target, 0.01, 1e-3, bmin, bmax)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert ctrl.integral.item() == pytest.approx(integrals[-1], rel=1e-9, abs=1e-12)


def test_control_vae_anti_windup_leaves_saturation_quickly():
    target, ki = 10.0, 1e-3
    kls = [target + 10.0] * 1000 + [target - 10.0] * 1000  # saturate at beta_max, then flip
    ctrl = ControlVAE(target, Ki=ki)
    got = _run(ctrl, kls)
    naive, naive_integral = _pi_reference(kls, target, 0.01, ki, 0.0, 1.0, anti_windup=False)
    assert got[999] == 1.0 and naive[999] == 1.0
    assert naive_integral[999] > 9.0  # the integral wound up far past the bound
    leave = next(i for i in range(1000, 2000) if got[i] < 1.0) - 1000
    leave_naive = next(i for i in range(1000, 2000) if naive[i] < 1.0) - 1000
    assert leave == 0  # anti-windup: off the bound at the first step after the flip
    assert leave_naive > 800  # without it, ~900 steps of unwinding first


def test_control_vae_returns_new_tensor_and_state_round_trips():
    ctrl = ControlVAE(5.0)
    beta = ctrl.update(torch.tensor([7.0, 9.0]))
    assert beta is not ctrl.beta and torch.equal(beta, ctrl.beta) and beta.dim() == 0
    assert ctrl.update(8.0).item() == pytest.approx(_pi_reference([8.0, 8.0], 5.0, 0.01, 1e-4, 0.0, 1.0)[0][1])
    clone = ControlVAE(5.0)
    clone.load_state_dict(ctrl.state_dict())
    assert torch.equal(clone.update(torch.tensor(3.0)), ctrl.update(torch.tensor(3.0)))
    ctrl.update(torch.tensor([1.0], dtype=F64))
    assert ctrl.beta.dtype == F64 and ctrl.integral.dtype == F64
    # The returned β is accepted by vae_loss.
    x = torch.randn(2, 4, dtype=F64)
    out = fusedvae.vae_loss(x, torch.rand(2, 4, dtype=F64), torch.randn(2, 3, dtype=F64),
                            torch.randn(2, 3, dtype=F64), beta=ctrl.update(torch.tensor([4.0], dtype=F64)))
    torch.testing.assert_close(out.loss, (out.rec + ctrl.beta * out.kl).mean())


def test_control_vae_compiles_without_graph_break_or_recompile():
    torch._dynamo.reset()
    eager, compiled_ctrl = ControlVAE(5.0, Ki=1e-2), ControlVAE(5.0, Ki=1e-2)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(compiled_ctrl.update, fullgraph=True, backend=counter)
    for kl in (9.0, 1.0, 50.0, 50.0, 5.0, -3.0):
        torch.testing.assert_close(compiled(torch.tensor([kl])), eager.update(torch.tensor([kl])))
    torch.testing.assert_close(compiled_ctrl.integral, eager.integral)
    assert counter.frame_count == 1 and _host_reads(counter) == []


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(kl_target=-1.0), "kl_target"),
        (dict(kl_target=float("inf")), "kl_target"),
        (dict(kl_target=1.0, Kp=-0.1), "Kp"),
        (dict(kl_target=1.0, Ki=-1e-4), "Ki"),
        (dict(kl_target=1.0, beta_min=-0.1), "beta_min"),
        (dict(kl_target=1.0, beta_min=0.5, beta_max=0.2), "beta_max"),
    ],
)
def test_control_vae_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        ControlVAE(**kwargs)


def test_control_vae_rejects_bad_kl():
    with pytest.raises(TypeError, match="kl"):
        ControlVAE(1.0).update(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="kl"):
        ControlVAE(1.0).update("3")


# ----------------------------------------------------------- on each device ---


def test_controllers_on_device_without_host_sync(device):
    # The state follows the inputs to the device, and on CUDA the updates never
    # read a value on the host; the values are the papers' update rules in floats.
    geco, ctrl = GECO(kappa=3.0, step_size=0.01), ControlVAE(2.0)
    rec = torch.tensor([4.0, 5.0], device=device)
    kl = torch.tensor([1.0, 1.5], device=device)
    geco.loss(VAELossOutput(rec.sum(), rec, kl))  # first calls move the state over
    ctrl.update(kl)
    assert geco.lambda_.device == rec.device and ctrl.beta.device == rec.device
    with no_host_sync(device):
        for _ in range(3):
            geco.loss(VAELossOutput(rec.sum(), rec, kl))
            ctrl.update(kl)
    _, lambdas = _geco_reference([[4.0, 5.0]] * 4, 3.0, geco.alpha, 0.01, 1.0, geco.lambda_min, geco.lambda_max)
    betas, _ = _pi_reference([1.25] * 4, 2.0, ctrl.Kp, ctrl.Ki, ctrl.beta_min, ctrl.beta_max)
    assert geco.lambda_.item() == pytest.approx(lambdas[-1], rel=1e-6)
    assert ctrl.beta.item() == pytest.approx(betas[-1], rel=1e-6, abs=1e-7)
