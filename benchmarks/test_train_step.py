"""Smoke tests of benchmarks/train_step.py: the --quick run on each device, the host-time mode, the tables.

The CUDA instance of each device test is skipped where no GPU is visible; the
pieces of the CUDA path that need no GPU (interleaving, statistics, the
table with the graph, no-graph and host columns) run on the CPU.
"""
from __future__ import annotations

import pytest
import torch

import train_step

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
MODELS = {"mlp": "MLP 64-32-4", "conv64": "conv VAE 3x32x32 Z8", "ldm256": "LDM AE 3x32x32 -> 4x4x4 ch8"}


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    # train_step compiles bench.eager_loss once per shape and fails at Dynamo's
    # recompile limit; other benchmark tests in the same process compile it too.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(text: str):
    """The cells of every markdown table row that is not a header or a rule."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| model ", "| loss ", "| case ")):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


@pytest.mark.parametrize("device", DEVICES)
def test_quick_run_has_every_model_and_loss(device, one_thread, tmp_path):
    out = tmp_path / "train_step.md"
    argv = ["--quick", "--device", device, "--threads", "1", "--repeats", "2", "--block-ms", "2",
            "--out", str(out)]
    assert train_step.main(argv) == 0
    text = out.read_text()
    assert text.startswith("Machine: ")
    assert "Command: `python benchmarks/train_step.py " + " ".join(argv) + "`" in text
    rows = _rows(text)
    steps = {(r[0], r[2]): r for r in rows if r[0] in MODELS.values() and len(r) > 3 and r[2] in train_step.LOSSES}
    assert set(steps) == {(m, loss) for m in MODELS.values() for loss in train_step.LOSSES}
    metrics = ("graph", "nograph", "host") if device == "cuda" else ("step",)
    for (model, loss), r in steps.items():
        assert float(r[3]) > 0, r
        shares = [c for c in r[4:] if "%" in c]
        # a share per metric that has one, none for the stand-in itself
        assert len(shares) == (0 if loss == "free" else sum(train_step.METRICS[m][1] for m in metrics)), r
    # the accuracy table: each real loss within its tolerance, for every model
    acc = [r for r in rows if r[0] in MODELS.values() and len(r) == 1 + len(train_step.REAL_LOSSES)]
    assert len(acc) == len(MODELS) and not any("FAIL" in c for r in acc for c in r)


@pytest.mark.parametrize("device", DEVICES)
def test_host_overhead_quick(device, one_thread, tmp_path):
    out = tmp_path / "host.md"
    assert train_step.main(["--host-overhead", "--quick", "--device", device, "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1  # the default of this mode
    rows = {r[0]: r for r in _rows(out.read_text()) if r[0] in train_step.LOSSES}
    assert set(rows) == set(train_step.LOSSES)
    assert rows["eager"][3] == "1.00x"
    assert all(float(r[1]) > 0 and r[3].endswith("x") for r in rows.values())


def test_check_losses_fails_loudly_on_a_wrong_loss(monkeypatch):
    def eager_without_kl(recon, target, mu, logvar, beta=1.0):
        return train_step.bench.eager_loss(recon, target, mu, 0 * mu + 0 * logvar, beta)

    spec = train_step.model_specs(quick=True)["mlp"]
    torch.manual_seed(0)
    model, x = spec.build(), torch.rand((spec.batch,) + spec.shape)
    report = train_step.check_losses(model, x, ("eager", "fused"))
    assert all(r["ok"] for r in report.values())
    monkeypatch.setitem(train_step.LOSSES, "eager", eager_without_kl)
    with pytest.raises(AssertionError, match="eager"):
        train_step.check_losses(model, x, ("eager", "fused"))


def test_cuda_tables_without_a_gpu():
    # cuda_timer's output, faked: the interleaving, statistics and table of the CUDA path.
    calls = []

    def fake(name, graph_ms):
        def run(n):
            calls.append((name, n))
            return {"graph": graph_ms, "nograph": graph_ms + 1.0, "host": 0.5}
        return run

    timers = {"eager": fake("eager", 3.0), "fused": fake("fused", 2.5), "free": fake("free", 2.0)}
    block = train_step.block_size(timers, block_ms=10.0)
    assert block == 5  # the fastest variant, 2 ms a step
    samples = train_step.interleave(timers, repeats=3, block=block)
    assert [c[0] for c in calls[3:]] == ["eager", "fused", "free", "fused", "free", "eager",
                                        "free", "eager", "fused"]
    assert samples["fused"]["graph"] == [2.5] * 3
    result = {"model": "m", "batch": 4, "ms": {k: {m: train_step.summarize(v) for m, v in per.items()}
                                              for k, per in samples.items()}}
    table = train_step.format_steps([result])
    header = table.splitlines()[0]
    assert "graph ms (device)" in header and "no-graph ms (synced)" in header and "host ms (issue)" in header
    eager = next(r for r in _rows(table) if r[2] == "eager")
    assert eager[3] == "3.000" and eager[5] == "1.000 (33 %)"  # graph: 3 ms against 2 ms free
    assert eager[8] == "1.000 (25 %)"  # no graph: 4 ms against 3 ms free
    assert eager[9] == "0.500" and len(eager) == 11  # host: no share column


def test_summarize():
    assert train_step.summarize([3.0]) == {"median": 3.0, "q1": 3.0, "q3": 3.0}
    s = train_step.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median"], s["q1"], s["q3"]) == (3.0, 2.0, 4.0)
