"""fusedvae.schedules against the papers' formulas, evaluated independently here.

(1) each schedule at chosen steps, (2) the tensor-step path against the Python
path, (3) write_ in place, (4) torch.compile(fullgraph=True) with a tensor step and
no recompilation, (5) bad arguments.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedvae
from fusedvae.schedules import CapacitySchedule, CyclicalAnneal, LinearWarmup, SigmoidAnneal
from helpers import no_host_sync, synchronize


# ------------------------------------------------------- 1. the formulas ---


def test_linear_warmup_values():
    s = LinearWarmup(1000, start=0.1, end=0.9)
    expected = {-5: 0.1, 0: 0.1, 250: 0.1 + 0.8 * 0.25, 500: 0.5, 999: 0.1 + 0.8 * 0.999, 1000: 0.9, 10**6: 0.9}
    for step, value in expected.items():
        assert s(step) == pytest.approx(value, rel=1e-15, abs=1e-15), step
    assert isinstance(s(250), float)
    # A decreasing warm-up is allowed too.
    assert LinearWarmup(10, start=1.0, end=0.0)(3) == pytest.approx(0.7, rel=1e-15)
    assert LinearWarmup(4)(1) == 0.25  # defaults 0 -> 1


def test_sigmoid_anneal_values():
    k, x0 = 0.0025, 2500
    s = SigmoidAnneal()  # Bowman et al.: 1 / (1 + exp(-k (t - x0)))
    assert (s.k, s.x0) == (k, x0)
    assert s(x0) == 0.5
    # sigma(ln 3) = 3/4 and sigma(-ln 3) = 1/4.
    assert s(x0 + math.log(3) / k) == pytest.approx(0.75, rel=1e-14)
    assert s(x0 - math.log(3) / k) == pytest.approx(0.25, rel=1e-14)
    for step in (0, 1000, 4000, 10_000):
        assert s(step) == pytest.approx(1 / (1 + math.exp(-k * (step - x0))), rel=1e-14), step
    # No overflow far from x0, on either side.
    assert s(-10**7) == 0.0 and s(10**7) == 1.0
    assert SigmoidAnneal(k=0.5, x0=10)(12) == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-14)


def _fu_cyclical_reference(n_iter, n_cycle, ratio, stop):
    """Fu et al. (2019), Algorithm/code form: a list over steps 0..n_iter-1."""
    values = [stop] * n_iter
    period = n_iter / n_cycle
    inc = stop / (period * ratio)
    for c in range(n_cycle):
        v, i = 0.0, 0
        while v <= stop and int(i + c * period) < n_iter:
            values[int(i + c * period)] = v
            v += inc
            i += 1
    return values


def test_cyclical_anneal_points():
    s = CyclicalAnneal(total_steps=1000, n_cycles=4, ratio=0.5, max_beta=2.0)
    # Cycles of 250 steps, rising over the first 125.
    expected = {
        0: 0.0, 50: 2.0 * 50 / 125, 125: 2.0, 126: 2.0, 249: 2.0,  # first cycle, ratio point at 125
        250: 0.0, 251: 2.0 / 125, 375: 2.0,                          # second cycle starts again at 0
        500: 0.0, 750: 0.0, 800: 2.0 * 50 / 125, 999: 2.0,            # last cycle
        1000: 2.0, 1001: 2.0, 10**6: 2.0, -3: 0.0,                   # after total_steps; before 0
    }
    for step, value in expected.items():
        assert s(step) == pytest.approx(value, rel=1e-15, abs=0), step


@pytest.mark.parametrize("total, cycles, ratio", [(1000, 4, 0.5), (600, 3, 0.25), (90, 1, 1.0), (64, 8, 0.75)])
def test_cyclical_anneal_matches_fu_et_al_code(total, cycles, ratio):
    expected = _fu_cyclical_reference(total, cycles, ratio, 1.5)
    s = CyclicalAnneal(total, n_cycles=cycles, ratio=ratio, max_beta=1.5)
    got = [s(t) for t in range(total)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # The tensor path over all steps at once (elementwise).
    steps = torch.arange(total, dtype=torch.int64)
    torch.testing.assert_close(s(steps), torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_cyclical_anneal_non_integer_period_and_ratio_zero():
    s = CyclicalAnneal(total_steps=10, n_cycles=4, ratio=0.5)  # cycles of 2.5 steps
    # step t sits at (t mod 2.5) / 2.5 of its cycle.
    for t, tau in [(0, 0.0), (1, 0.4), (2, 0.8), (3, 0.2), (5, 0.0), (6, 0.4), (7, 0.8), (9, 0.6)]:
        assert s(t) == pytest.approx(min(1.0, tau / 0.5), abs=1e-15), t
        assert s(torch.tensor(t)).item() == pytest.approx(min(1.0, tau / 0.5), abs=1e-6), t
    flat = CyclicalAnneal(total_steps=100, n_cycles=2, ratio=0.0, max_beta=0.3)
    assert [flat(t) for t in (0, 50, 99, 100)] == [0.3] * 4
    assert torch.equal(flat(torch.arange(0, 120, 7)), torch.full((18,), 0.3))


def test_capacity_schedule_values():
    s = CapacitySchedule()
    assert (s.c_max, s.steps, s.gamma) == (25.0, 100000, 1000.0)  # Burgess et al.'s dSprites setting
    for step, c in {-1: 0.0, 0: 0.0, 20_000: 5.0, 50_000: 12.5, 100_000: 25.0, 250_000: 25.0}.items():
        assert s.capacity(step) == pytest.approx(c, rel=1e-15), step
        assert s(step) == s.capacity(step)


@pytest.mark.parametrize("kl_mean_above", [True, False])
def test_capacity_loss_value_and_gradient(kl_mean_above):
    s = CapacitySchedule(c_max=10.0, steps=100, gamma=50.0)
    step = 40  # C = 4
    rec = torch.tensor([3.0, 5.0, 10.0, 2.0], dtype=torch.float64, requires_grad=True)
    kl_values = [5.5, 6.5, 3.5, 2.5] if kl_mean_above else [0.5, 1.5, 2.5, 1.5]  # mean 4.5 or 1.5
    kl = torch.tensor(kl_values, dtype=torch.float64, requires_grad=True)
    out = fusedvae.VAELossOutput(loss=torch.zeros(()), rec=rec, kl=kl)
    loss = s.loss(out, step)
    kl_mean = sum(kl_values) / 4
    assert loss.item() == pytest.approx(5.0 + 50.0 * abs(kl_mean - 4.0), rel=1e-14)
    loss.backward()
    sign = 1.0 if kl_mean_above else -1.0
    torch.testing.assert_close(rec.grad, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(kl.grad, torch.full((4,), sign * 50.0 / 4, dtype=torch.float64))
    # A tensor step gives the same objective.
    torch.testing.assert_close(s.loss(out, torch.tensor(step)), loss.detach(), rtol=1e-7, atol=0)


def test_capacity_loss_with_vae_loss_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 8, generator=g, dtype=torch.float64)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lv = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = CapacitySchedule(c_max=2.0, steps=10, gamma=7.0)
    s.loss(fusedvae.vae_loss(x, t, mu, lv, beta=0.0), 5).backward()
    ref = fusedvae.reference.vae_loss(x.detach(), t, mu.detach(), lv.detach())
    kl_mean = ref.kl.mean().item()
    assert kl_mean != pytest.approx(1.0)
    # d/dmu of gamma * |mean kl - 1| = gamma * sign * mu / B.
    sign = 1.0 if kl_mean > 1.0 else -1.0
    torch.testing.assert_close(mu.grad, 7.0 * sign * mu.detach() / 3, rtol=1e-10, atol=1e-12)


# ------------------------------------------ 2. tensor path == float path ---

SCHEDULES = [
    LinearWarmup(300, start=0.2, end=1.3),
    SigmoidAnneal(k=0.01, x0=250),
    CyclicalAnneal(total_steps=600, n_cycles=3, ratio=0.4, max_beta=0.8),
    CyclicalAnneal(total_steps=100, n_cycles=3, ratio=0.7),
    CapacitySchedule(c_max=25.0, steps=400),
]
SCHEDULE_IDS = ["linear", "sigmoid", "cyclical", "cyclical-fractional", "capacity"]
STEPS = [-7, 0, 1, 33, 80, 99, 100, 120, 199, 200, 250, 280, 300, 399, 400, 401, 599, 600, 601, 5000]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_tensor_step_matches_float_step(schedule, dtype):
    expected = torch.tensor([schedule(t) for t in STEPS], dtype=torch.float64)
    for t, e in zip(STEPS, expected):
        got = schedule(torch.tensor(t, dtype=dtype))
        assert got.dim() == 0
        assert got.dtype == (dtype if dtype.is_floating_point else torch.get_default_dtype())
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got.double(), e, rtol=tol, atol=tol, msg=f"step {t}")
    # Elementwise on a vector of steps as well.
    got = schedule(torch.tensor(STEPS, dtype=dtype)).double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_float_step():
    # A Python float step is allowed and consistent with the integer steps around it.
    s = LinearWarmup(10)
    assert s(2.5) == 0.25
    c = CyclicalAnneal(total_steps=8, n_cycles=2, ratio=0.5)
    assert c(1.0) == c(1) == 0.5 and c(5.0) == c(5) == 0.5 and c(4.5) == 0.25


# --------------------------------------------------------------- 3. write_ ---


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_write_in_place(schedule):
    beta = torch.zeros(())
    ptr, version = beta.data_ptr(), beta._version
    ret = schedule.write_(beta, 120)
    assert ret is beta and beta.data_ptr() == ptr and beta._version > version
    assert beta.item() == pytest.approx(schedule(120), rel=1e-6)
    ret = schedule.write_(beta, torch.tensor(280))
    assert ret is beta and beta.data_ptr() == ptr
    assert beta.item() == pytest.approx(schedule(280), rel=1e-6)
    beta64 = torch.zeros((), dtype=torch.float64)
    schedule.write_(beta64, torch.tensor(199.0, dtype=torch.float64))
    assert beta64.dtype == torch.float64 and beta64.item() == pytest.approx(schedule(199), rel=1e-12)


def test_write_rejects_bad_targets_and_steps():
    s = LinearWarmup(10)
    with pytest.raises(TypeError, match="beta"):
        s.write_(torch.zeros((), dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="beta"):
        s.write_(0.0, 3)
    with pytest.raises(TypeError, match="step"):
        s("3")
    with pytest.raises(TypeError, match="step"):
        s(True)
    with pytest.raises(TypeError, match="step"):
        s(torch.tensor(True))


def test_write_feeds_vae_loss():
    # The tensor written in place is what VAELoss reads on the next call.
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 6, generator=g), torch.rand(2, 6, generator=g)
    mu, lv = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    beta = torch.zeros(())
    loss_fn = fusedvae.VAELoss(beta=beta)
    s = SigmoidAnneal(k=1.0, x0=0)
    for step in (-2, 0, 3):
        s.write_(beta, torch.tensor(step))
        out = loss_fn(x, t, mu, lv)
        ref = fusedvae.reference.vae_loss(x, t, mu, lv, beta=1 / (1 + math.exp(-step)))
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ 4. compile ---


def _host_reads(counter):
    """Nodes of the captured graphs that read a tensor value on the host (a sync on CUDA)."""
    names = ("item", "tolist", "_local_scalar_dense")
    return [n for g in counter.graphs for n in g.graph.nodes if any(k in str(n.target) for k in names)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_compiled_write_without_graph_break_or_recompile(schedule):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")

    def step_fn(beta, step):
        schedule.write_(beta, step)
        step.add_(1)
        return beta * 2

    compiled = torch.compile(step_fn, fullgraph=True, backend=counter)
    beta = torch.zeros(())
    step = torch.tensor(97, dtype=torch.int64)
    for t in range(97, 104):
        doubled = compiled(beta, step)
        assert beta.item() == pytest.approx(schedule(t), rel=1e-6, abs=1e-7), t
        assert doubled.item() == pytest.approx(2 * schedule(t), rel=1e-6, abs=1e-7)
    assert step.item() == 104
    assert counter.frame_count == 1  # one graph, reused for every step value
    assert _host_reads(counter) == []


# ------------------------------------------------------ 5. bad arguments ---


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda: LinearWarmup(0), "warmup_steps"),
        (lambda: LinearWarmup(-5), "warmup_steps"),
        (lambda: LinearWarmup(10.0), "warmup_steps"),
        (lambda: LinearWarmup(True), "warmup_steps"),
        (lambda: LinearWarmup(10, start=float("nan")), "start"),
        (lambda: LinearWarmup(10, end=float("inf")), "end"),
        (lambda: SigmoidAnneal(k=0.0), "k"),
        (lambda: SigmoidAnneal(k=-1.0), "k"),
        (lambda: SigmoidAnneal(x0=float("nan")), "x0"),
        (lambda: CyclicalAnneal(0), "total_steps"),
        (lambda: CyclicalAnneal(100, n_cycles=0), "n_cycles"),
        (lambda: CyclicalAnneal(100, n_cycles=2.0), "n_cycles"),
        (lambda: CyclicalAnneal(100, ratio=1.5), "ratio"),
        (lambda: CyclicalAnneal(100, ratio=-0.1), "ratio"),
        (lambda: CyclicalAnneal(100, ratio="half"), "ratio"),
        (lambda: CyclicalAnneal(100, max_beta=-1.0), "max_beta"),
        (lambda: CapacitySchedule(c_max=-1.0), "c_max"),
        (lambda: CapacitySchedule(steps=0), "steps"),
        (lambda: CapacitySchedule(gamma=0.0), "gamma"),
    ],
)
def test_bad_arguments(factory, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        factory()


def test_capacity_loss_rejects_non_output():
    with pytest.raises(TypeError, match="VAELossOutput"):
        CapacitySchedule().loss((torch.zeros(2), torch.zeros(2)), 0)


def test_exported():
    assert fusedvae.schedules.CyclicalAnneal is CyclicalAnneal
    assert "schedules" in fusedvae.__all__
    assert set(fusedvae.schedules.__all__) == {"LinearWarmup", "SigmoidAnneal", "CyclicalAnneal", "CapacitySchedule"}


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_write_on_device_without_host_sync(device, schedule):
    # A step counter on the device; on CUDA write_ must not read it on the host.
    beta = torch.zeros((), device=device)
    step = torch.tensor(120, device=device)
    schedule.write_(beta, step)  # warm-up outside the check
    synchronize(device)
    with no_host_sync(device):
        for _ in range(3):
            step.add_(40)
            schedule.write_(beta, step)
    assert beta.device == step.device
    assert beta.item() == pytest.approx(schedule(240), rel=1e-6, abs=1e-7)
