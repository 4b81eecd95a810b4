"""benchmarks/gpu_bench.py without a GPU: its arithmetic, its tables, its host timer and its steps.

The script is imported from its path. Everything in it but the CUDA timers and
``main`` runs here on the CPU; the CUDA timers run in
``test_main_on_cuda`` wherever a GPU is visible.
"""
from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

import fusedvae
from fusedvae import bench, reference

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_bench.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_bench = _load()

# The default case: [64, 3, 256, 256] logits, Z = 512.
NUMEL = 64 * 3 * 256 * 256  # 12_582_912
LATENT_BYTES = 2 * 3 * 64 * 512 * 4  # mu and logvar, float32: read, read again, gradient written


def test_bytes_per_element_of_each_case():
    # fp32 recon, fp32 target: read 4 + 4 forward, 4 + 4 backward, write 4;
    # a uint8 target reads 1 twice instead of 4; bf16 recon 2 three times.
    assert [c[3] for c in gpu_bench.CASES] == [20, 14, 8]
    assert gpu_bench.element_bytes(4, 4) == 20
    assert gpu_bench.element_bytes(4, 1) == 14
    assert gpu_bench.element_bytes(2, 1) == 8
    assert gpu_bench.element_bytes(2, 2) == 10


def test_min_bytes_counts_the_latents():
    assert gpu_bench.latent_bytes(64, 512) == LATENT_BYTES == 786_432
    assert gpu_bench.latent_bytes(64, 512, itemsize=2) == LATENT_BYTES // 2
    assert gpu_bench.min_bytes(NUMEL, 4, 4, 64, 512) == 251_658_240 + 786_432
    assert gpu_bench.min_bytes(NUMEL, 4, 1, 64, 512) == 14 * NUMEL + LATENT_BYTES
    assert gpu_bench.min_bytes(NUMEL, 2, 1, 64, 512) == 8 * NUMEL + LATENT_BYTES


def test_dmol_bytes_of_each_case():
    # [B, 100, H, W] float32 parameters (K = 10) read once and their gradient
    # written once, [B, 3, H, W] uint8 images read once.
    assert gpu_bench.dmol_params_bytes(32, 32) == 32 * 100 * 32 * 32 * 4 == 13_107_200
    assert gpu_bench.dmol_min_bytes(32, 32) == 2 * 13_107_200 + 32 * 3 * 32 * 32 == 26_312_704
    assert gpu_bench.dmol_min_bytes(32, 32, 4, 4) == 2 * 13_107_200 + 4 * 98_304  # a float32 target
    assert gpu_bench.dmol_min_bytes(32, 32, 2, 1) == 13_107_200 + 98_304  # bfloat16 parameters
    assert gpu_bench.dmol_params_bytes(1, 1, components=3) == 30 * 4
    assert gpu_bench.DMOL_CASES == [
        ("DMOL 32x3x32x32, K=10", 32, 32, 26_312_704),
        ("DMOL 8x3x64x64, K=10", 8, 64, 26_312_704),  # as many pixels
        ("DMOL 4x3x256x256, K=10", 4, 256, 2 * 104_857_600 + 786_432),
    ]
    # the dtypes the bytes are counted for are those the inputs have
    params, target = bench.make_dmol_inputs(1, 2)
    assert (params.dtype, target.dtype) == (gpu_bench.DMOL_PARAMS_DTYPE, gpu_bench.DMOL_TARGET_DTYPE)
    # 210_501_632 B at 3000 GB/s
    assert gpu_bench.floor_ms(gpu_bench.DMOL_CASES[2][3], 3000.0) == pytest.approx(0.070167210666, rel=1e-9)
    # a forward, then a backward that reads parameters and images again, at copy
    # speed: 803 of 1206 bytes per pixel, 67 % of the floor
    params_bytes, target_bytes = gpu_bench.dmol_params_bytes(4, 256), 4 * 3 * 256 * 256
    two_pass = gpu_bench.floor_ms(3 * params_bytes + 2 * target_bytes, 3000.0)
    assert gpu_bench.percent_of_floor(gpu_bench.floor_ms(gpu_bench.DMOL_CASES[2][3], 3000.0), two_pass) == \
        pytest.approx(100 * 803 / 1206)


def test_copy_moves_at_least_one_gib():
    gib = 2**30
    assert gpu_bench.copy_bytes() == gib
    assert gpu_bench.copy_bytes(252_444_672, 100) == gib  # the default cases need less
    assert gpu_bench.copy_bytes(3 * gib, 5) == 3 * gib


def test_floor_is_bytes_over_measured_bandwidth():
    # A 1 GiB copy in 0.5 ms: 2 GiB moved (read + write) -> 4294.967296 GB/s.
    gbs = gpu_bench.bandwidth_gbs(2**30, 0.5)
    assert gbs == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9, rel=1e-12)
    assert gbs == pytest.approx(4294.967296, rel=1e-12)
    nbytes = gpu_bench.min_bytes(NUMEL, 4, 4, 64, 512)  # 252_444_672
    # 252_444_672 B at 4294.967296e9 B/s: 252_444_672 / 2**32 ms (2**32 = 4294967296), exactly
    assert gpu_bench.floor_ms(nbytes, gbs) == pytest.approx(252_444_672 / 4294.967296e9 * 1e3, rel=1e-12)
    assert gpu_bench.floor_ms(nbytes, gbs) == pytest.approx(0.05877685546875, rel=1e-12)
    assert gpu_bench.floor_ms(3_000_000_000, 3000.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gpu_bench.floor_ms(nbytes, 0.0)
    with pytest.raises(ValueError):
        gpu_bench.bandwidth_gbs(2**30, 0.0)


def test_percent_of_floor():
    assert gpu_bench.percent_of_floor(0.05, 0.1) == pytest.approx(50.0)
    assert gpu_bench.percent_of_floor(0.1, 0.1) == pytest.approx(100.0)


def _rows():
    nbytes = gpu_bench.min_bytes(NUMEL, 4, 1, 64, 512)  # 176_947_200
    ms = {"eager": 0.9, "compiled": 0.3, "fused": 0.12}
    host = {"eager": 0.45, "compiled": 0.2, "fused": 0.03}
    how = {"compiled": "not captured (RuntimeError: boom); timed with CUDA events around eager steps"}
    return [
        gpu_bench.case_row("fp32 recon, uint8 target", nbytes, 3000.0, ms, host, how),
        gpu_bench.case_row("fp32 recon, fp32 target", gpu_bench.min_bytes(NUMEL, 4, 4, 64, 512), 3000.0,
                           {"eager": 1.0, "compiled": 0.5, "fused": 0.25}, host),
    ]


def test_case_row_numbers():
    row = _rows()[0]
    floor = (14 * NUMEL + LATENT_BYTES) / 3000e9 * 1e3  # 0.0589824 ms
    assert row["min_bytes"] == 14 * NUMEL + LATENT_BYTES
    assert row["floor_ms"] == pytest.approx(floor, rel=1e-12)
    assert row["percent_of_floor"] == pytest.approx(100 * floor / 0.12, rel=1e-12)
    assert row["eager/fused"] == pytest.approx(7.5)
    assert row["compiled/fused"] == pytest.approx(2.5)


def test_format_table():
    rows = _rows()
    text = gpu_bench.format_table(rows, 3000.0, 2**30)
    lines = text.splitlines()
    assert "3000 GB/s" in lines[0] and "1.00 GiB" in lines[0]
    header = next(line for line in lines if line.startswith("| case | min MB"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["case", "min MB", "floor ms", "eager ms", "compile ms", "fused ms", "fused % of floor",
                    "eager/fused", "compile/fused"]
    row = next(line for line in lines if line.startswith("| fp32 recon, uint8 target |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["fp32 recon, uint8 target", "176.9", "0.05898", "0.900", "0.300*", "0.120", "49 %",
                     "7.50x", "2.50x"]
    # the second case was captured throughout: no mark
    row2 = next(line for line in lines if line.startswith("| fp32 recon, fp32 target |"))
    assert "*" not in row2 and "34 %" in row2  # floor 0.0841 ms / 0.25 ms
    # the fallback is explained, naming case and method
    assert any(line.startswith("* fp32 recon, uint8 target, compiled: not captured (RuntimeError: boom)")
               for line in lines)
    # host times in their own table, said to be the host's cost
    host_header = lines.index("| case | eager host ms | compile host ms | fused host ms |")
    assert "host" in lines[host_header - 2].lower() and "not device time" in lines[host_header - 2]
    assert lines[host_header + 2] == "| fp32 recon, uint8 target | 0.450 | 0.200 | 0.030 |"


def test_format_table_keeps_a_tiny_floor():
    # Four significant digits, not three decimals: a small case's floor (as the
    # GPU tests' 2x3x16x16 run) must not print as 0.
    host = {"eager": 0.1, "compiled": 0.1, "fused": 0.1}
    row = gpu_bench.case_row("tiny", 30_720, 3000.0, host, host)
    line = next(l for l in gpu_bench.format_table([row], 3000.0, 2**30).splitlines() if l.startswith("| tiny |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:3] == ["0.03072", "1.024e-05"]


def test_memory_table():
    ms = {"eager": 0.9, "compiled": 0.3, "fused": 0.12}
    peak = {"eager": 80_000_000, "compiled": 30_000_000, "fused": 13_200_000}
    row = gpu_bench.case_row("DMOL 32x3x32x32, K=10", 26_312_704, 3000.0, ms, ms, peak_bytes=peak,
                             output_bytes=13_107_200)
    assert row["x_output"] == pytest.approx({"eager": 6.103515625, "compiled": 2.288818359375,
                                             "fused": 1.007080078125})
    assert row["percent_of_floor"] == pytest.approx(100 * 26_312_704 / 3e12 * 1e3 / 0.12)
    lines = gpu_bench.format_table(_rows() + [row], 3000.0, 2**30).splitlines()
    header = lines.index("| case | params MB | eager MB | compile MB | fused MB |")
    assert "decoder output" in lines[header - 2] and "1.2x" in lines[header - 2]
    # only the row with memory, after the host table
    assert lines[header + 2:] == ["| DMOL 32x3x32x32, K=10 | 13.1 | 80.0 (6.10x) | 30.0 (2.29x) | 13.2 (1.01x) |"]
    assert lines.index("| case | eager host ms | compile host ms | fused host ms |") < header
    # no memory measured: no memory table
    assert "params MB" not in gpu_bench.format_table(_rows(), 3000.0, 2**30)


def test_dmol_accuracy_in_the_form_of_bench_accuracy():
    params, target = bench.make_dmol_inputs(1, 4)
    acc = gpu_bench.dmol_accuracy(params, target, {
        "eager": reference.discretized_mix_logistic_nll,
        "fused": lambda p, t: reference.discretized_mix_logistic_nll(p, t) * 1.001,
    })
    assert acc["eager"]["ok"] and acc["eager"]["problems"] == []
    assert acc["eager"]["loss_err"] <= bench.DMOL_NLL_RTOL and acc["eager"]["grad_err"] <= bench.DMOL_GRAD_RTOL
    assert not acc["fused"]["ok"]
    assert acc["fused"]["problems"] == [  # 1e-3 off in both
        f"NLL: relative error {acc['fused']['loss_err']:.2e} > 2e-05",
        f"gradient: relative error {acc['fused']['grad_err']:.2e} > 0.0001"]
    assert (acc["fused"]["loss_tol"], acc["fused"]["grad_tol"]) == (bench.DMOL_NLL_RTOL, bench.DMOL_GRAD_RTOL)
    table = bench.format_accuracy([("DMOL", acc)])
    assert "| DMOL | " in table and table.rstrip().endswith("FAIL |")


def test_time_host_is_wall_time_per_call():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = gpu_bench.time_host(fn, 10, device="cpu")
    assert len(calls) == 10
    # per call, not in total (which is >= 20 ms); slack for a loaded machine
    assert 2.0 <= ms < 10.0
    with pytest.raises(ValueError):
        gpu_bench.time_host(fn, 0)


def test_interleave_rotates_and_takes_the_median():
    order = []
    samples = {"a": iter([1.0, 5.0, 3.0]), "b": iter([10.0, 30.0, 20.0])}

    def timer(name):
        def run():
            order.append(name)
            return next(samples[name])
        return run

    ms = gpu_bench.interleave({"a": timer("a"), "b": timer("b")}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert ms == {"a": 3.0, "b": 20.0}
    with pytest.raises(ValueError):
        gpu_bench.interleave({"a": timer("a")}, 0)


def test_device_timers_fall_back_where_capture_fails():
    captured, replayed, eager = [], [], []

    def capture(step, warmup):
        if step is steps["compiled"]:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        captured.append((step, warmup))
        return f"graph-{len(captured)}", step()

    steps = {"eager": lambda: "e", "compiled": lambda: "c", "fused": lambda: "f"}
    recovered = []
    timers, how, keep = gpu_bench.device_timers(
        steps, 7, 2, capture=capture,
        time_replays=lambda graph, iters: replayed.append((graph, iters)) or 1.0,
        time_eager=lambda fn, iters: eager.append((fn(), iters)) or 2.0,
        recover=lambda: recovered.append(True))
    assert [w for _, w in captured] == [2, 2] and recovered == [True]
    assert set(how) == {"compiled"}
    assert how["compiled"].startswith("not captured (RuntimeError: operation not permitted")
    assert "more" not in how["compiled"]
    assert keep == [("graph-1", "e"), ("graph-2", "f")]
    assert [timers[m]() for m in ("eager", "compiled", "fused")] == [1.0, 2.0, 1.0]
    assert replayed == [("graph-1", 7), ("graph-2", 7)] and eager == [("c", 7)]


def test_make_inputs_on_cpu():
    recon, target, mu, logvar = gpu_bench.make_inputs((2, 3, 8, 8), 5, torch.bfloat16, torch.uint8, device="cpu")
    assert recon.dtype == torch.bfloat16 and recon.shape == (2, 3, 8, 8) and recon.requires_grad
    assert target.dtype == torch.uint8 and not target.requires_grad
    assert mu.shape == logvar.shape == (2, 5) and mu.dtype == gpu_bench.LATENT_DTYPE and logvar.requires_grad
    _, target32, _, _ = gpu_bench.make_inputs((2, 3, 8, 8), 5, torch.float32, torch.float32, device="cpu")
    assert target32.dtype == torch.float32 and 0 <= float(target32.min()) and float(target32.max()) <= 1


@pytest.mark.parametrize("method", ["eager", "fused"])
def test_make_step_returns_one_steps_gradients(method):
    # The captured step must not accumulate: two calls give the same
    # gradients, those of one loss.backward(), and leave .grad untouched.
    inputs = gpu_bench.make_inputs((2, 3, 8, 8), 5, torch.float32, torch.uint8, device="cpu")
    step = gpu_bench.make_step(bench.METHODS[method], inputs, beta=0.7)
    first = [t.clone() for t in step()]
    second = step()
    assert all(t.grad is None for t in inputs)
    recon, target, mu, logvar = inputs
    loss = bench.step(bench.METHODS[method], recon, target, mu, logvar, 0.7)
    expected = [loss, recon.grad, mu.grad, logvar.grad]
    for a, b, e in zip(first, second, expected, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, e)
    assert first[1].shape == recon.shape and first[2].shape == mu.shape


def test_case_bytes_follow_the_arguments():
    args = gpu_bench.parse_args([])
    assert gpu_bench.case_bytes(args) == {
        "fp32 recon, fp32 target": 20 * NUMEL + LATENT_BYTES,
        "fp32 recon, uint8 target": 14 * NUMEL + LATENT_BYTES,
        "bf16 recon, uint8 target": 8 * NUMEL + LATENT_BYTES,
    }
    small = gpu_bench.case_bytes(gpu_bench.parse_args(["--batch", "2", "--size", "8", "--latent", "4"]))
    assert small["fp32 recon, uint8 target"] == 14 * 2 * 3 * 8 * 8 + 2 * 3 * 2 * 4 * 4


@pytest.fixture
def fresh_dynamo():
    # run_cases compiles eager_loss for three more shapes: start from a clean
    # slate so that no other test's compilations count towards dynamo's
    # recompile limit, and leave one.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cpu_timers(captured):
    """device_timers with CPU stand-ins for the CUDA capture and replay: the
    "graph" is the step itself, replayed by calling it; the compiled step's
    capture fails."""

    def timers(steps, iters, warmup):
        def capture(step, warmup):
            if step is steps["compiled"]:
                raise RuntimeError("capture failed")
            captured.append(step)
            return step, step()

        return gpu_bench.device_timers(
            steps, iters, warmup, capture=capture,
            time_replays=lambda graph, n: gpu_bench.time_host(graph, n, "cpu"),
            time_eager=lambda fn, n: gpu_bench.time_host(fn, n, "cpu"),
            recover=lambda: None)

    return timers


SMALL_ARGS = ["--batch", "2", "--size", "8", "--latent", "4", "--iters", "2", "--repeats", "2"]


def test_run_cases_and_report_on_the_cpu(fresh_dynamo):
    """main's loop on the CPU, with stand-ins for the CUDA timers."""
    args = gpu_bench.parse_args(SMALL_ARGS)
    captured = []
    rows, accuracy_rows = gpu_bench.run_cases(args, 3000.0, device="cpu", timers=_cpu_timers(captured))
    names = [c[0] for c in gpu_bench.CASES]
    assert [r["case"] for r in rows] == names == [a for a, _ in accuracy_rows]
    assert len(captured) == 2 * len(names)  # eager and fused in every case
    nbytes = gpu_bench.case_bytes(args)
    for r in rows:
        assert r["min_bytes"] == nbytes[r["case"]]
        assert r["floor_ms"] == pytest.approx(nbytes[r["case"]] / 3000e9 * 1e3)
        assert set(r["ms"]) == set(r["host_ms"]) == set(bench.METHODS)
        assert all(v > 0 for v in (*r["ms"].values(), *r["host_ms"].values()))
        assert set(r["how"]) == {"compiled"} and "capture failed" in r["how"]["compiled"]
    text, failed = gpu_bench.report(rows, accuracy_rows, 3000.0, 2**30)
    assert failed == [], failed
    lines = text.splitlines()
    for name in names:
        device_row = next(line for line in lines if line.startswith(f"| {name} |") and "%" in line)
        assert device_row.split("|")[5].strip().endswith("*")  # compile ms, marked
        assert any(line.startswith(f"* {name}, compiled: not captured (RuntimeError: capture failed)")
                   for line in lines)
    assert "Relative error against the float64 reference" in text

    # a method outside its tolerance is reported, naming case and method
    bad = [(name, {m: dict(r) for m, r in acc.items()}) for name, acc in accuracy_rows]
    bad[2][1]["fused"].update(ok=False, problems=["loss off"])
    _, failed = gpu_bench.report(rows, bad, 3000.0, 2**30)
    assert failed == ["bf16 recon, uint8 target fused: loss off"]


def test_run_dmol_cases_and_report_on_the_cpu(fresh_dynamo):
    """main's loop over the discretized mixture on the CPU, one small case, with stand-ins for the CUDA timers."""
    args = gpu_bench.parse_args(SMALL_ARGS)
    cases = [("DMOL 2x3x8x8, K=10", 2, 8, gpu_bench.dmol_min_bytes(2, 8))]
    captured, measured = [], []

    def peak(step):  # what the step returns: the [B] NLL and the gradient
        measured.append(step)
        return sum(t.numel() * t.element_size() for t in step())

    rows, accuracy_rows = gpu_bench.run_dmol_cases(args, 3000.0, device="cpu", timers=_cpu_timers(captured),
                                                   peak=peak, cases=cases)
    assert [r["case"] for r in rows] == [a for a, _ in accuracy_rows] == ["DMOL 2x3x8x8, K=10"]
    (row,) = rows
    (_, acc), = accuracy_rows
    assert set(acc) == set(row["ms"]) == set(row["host_ms"]) == set(gpu_bench.DMOL_METHODS)
    assert all(r["ok"] for r in acc.values()), acc
    assert len(captured) == 2 and len(measured) == 3  # eager and fused captured; every method measured
    assert row["min_bytes"] == 2 * (2 * 100 * 8 * 8 * 4) + 2 * 3 * 8 * 8 == 102_784
    assert row["floor_ms"] == pytest.approx(102_784 / 3e12 * 1e3)
    assert row["output_bytes"] == 51_200
    assert row["peak_bytes"] == dict.fromkeys(gpu_bench.DMOL_METHODS, 51_200 + 2 * 4)
    assert row["x_output"]["fused"] == pytest.approx(1 + 8 / 51_200)
    assert set(row["how"]) == {"compiled"} and "capture failed" in row["how"]["compiled"]
    text, failed = gpu_bench.report(rows, accuracy_rows, 3000.0, 2**30)
    assert failed == [], failed
    lines = text.splitlines()
    assert any(line.startswith("| DMOL 2x3x8x8, K=10 | 0.1028 | 3.426e-05 | ") for line in lines)
    assert "| DMOL 2x3x8x8, K=10 | 0.1 | 0.1 (1.00x) | 0.1 (1.00x) | 0.1 (1.00x) |" in lines
    assert any(line.startswith("| DMOL 2x3x8x8, K=10 | ") and "[2e-05]" in line for line in lines)  # accuracy


def test_parse_args():
    args = gpu_bench.parse_args([])
    assert (args.batch, args.size, args.latent, args.iters, args.repeats, args.beta) == (64, 256, 512, 50, 5, 1.0)
    assert not args.no_dmol and gpu_bench.parse_args(["--no-dmol"]).no_dmol
    assert not args.cuda_wide_loads and gpu_bench.parse_args(["--cuda-wide-loads"]).cuda_wide_loads
    assert not args.cuda_fast_exp and gpu_bench.parse_args(["--cuda-fast-exp"]).cuda_fast_exp
    assert not args.cuda_accurate_mixture and gpu_bench.parse_args(["--cuda-accurate-mixture"]).cuda_accurate_mixture
    assert not args.cuda_mixture_fast_scale
    assert gpu_bench.parse_args(["--cuda-mixture-fast-scale"]).cuda_mixture_fast_scale
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--iters", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_needs_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_bench.main(["--batch", "2", "--size", "8"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_main_on_cuda(capsys):
    if not fusedvae.has_cuda_kernels():
        pytest.skip("fusedvae was built without CUDA kernels")
    rc = gpu_bench.main(["--batch", "2", "--size", "16", "--latent", "8", "--iters", "3", "--repeats", "2",
                         "--no-dmol"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| case | min MB"))) + 2
    rows = lines[first:first + len(gpu_bench.CASES)]
    assert [r.split("|")[1].strip() for r in rows] == [c[0] for c in gpu_bench.CASES], out
    assert "*" not in "".join(rows), out  # every method captured
    assert all(float(r.split("|")[3]) > 0 for r in rows)  # floor ms
    assert "| case | eager host ms | compile host ms | fused host ms |" in lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dmol_cases_on_cuda(fresh_dynamo):
    if not fusedvae.has_cuda_kernels():
        pytest.skip("fusedvae was built without CUDA kernels")
    args = gpu_bench.parse_args(["--iters", "3", "--repeats", "2"])
    cases = [("DMOL 2x3x16x16, K=10", 2, 16, gpu_bench.dmol_min_bytes(2, 16))]
    rows, accuracy_rows = gpu_bench.run_dmol_cases(args, 3000.0, cases=cases)
    (row,), ((_, acc),) = rows, accuracy_rows
    assert all(r["ok"] for r in acc.values()), acc
    assert row["how"] == {}, row["how"]  # every method captured
    assert all(v > 0 for v in row["ms"].values())
    # each step holds at least the gradient it returns, as large as the parameters
    assert all(b >= row["output_bytes"] == 2 * 100 * 16 * 16 * 4 for b in row["peak_bytes"].values()), row


def test_variant_kernels_are_timed_beside_fused(fresh_dynamo):
    """--cuda-wide-loads and --cuda-fast-exp add fused_variant to every VAE case, --cuda-accurate-mixture
    (or --cuda-mixture-fast-scale) to every mixture case: timed, checked, in their own columns."""
    args = gpu_bench.parse_args(SMALL_ARGS + ["--cuda-wide-loads", "--cuda-fast-exp", "--cuda-accurate-mixture"])
    assert gpu_bench.variant_settings(args, gpu_bench.VAE_SWITCHES) == [(fusedvae._C._set_cuda_wide_loads, True),
                                                                       (fusedvae._C._set_cuda_fast_exp, True)]
    assert gpu_bench.variant_settings(args, gpu_bench.DMOL_SWITCHES) == [
        (fusedvae._C._set_cuda_mixture_fast_math, False)]
    fast_scale = gpu_bench.parse_args(SMALL_ARGS + ["--cuda-mixture-fast-scale"])
    assert gpu_bench.variant_settings(fast_scale, gpu_bench.DMOL_SWITCHES) == [
        (fusedvae._C._set_cuda_mixture_fast_scale, True)]
    rows, accuracy_rows = gpu_bench.run_cases(args, 3000.0, device="cpu", timers=_cpu_timers([]))
    cases = [("DMOL 2x3x8x8, K=10", 2, 8, gpu_bench.dmol_min_bytes(2, 8))]
    dmol_rows, dmol_accuracy = gpu_bench.run_dmol_cases(args, 3000.0, device="cpu", timers=_cpu_timers([]),
                                                        peak=lambda step: 1, cases=cases)
    for row, (_, acc) in zip(rows, accuracy_rows):
        assert set(row["ms"]) == set(row["host_ms"]) == set(acc) == {*bench.METHODS, gpu_bench.VARIANT}
    for row, (_, acc) in zip(dmol_rows, dmol_accuracy):
        assert set(row["ms"]) == set(row["host_ms"]) == set(acc) == {*gpu_bench.DMOL_METHODS, gpu_bench.VARIANT}
    for row, (_, acc) in zip(rows + dmol_rows, accuracy_rows + dmol_accuracy):
        assert acc[gpu_bench.VARIANT]["ok"], acc
        assert row["percent_of_floor_variant"] == pytest.approx(100 * row["floor_ms"] / row["ms"][gpu_bench.VARIANT])
    plain = gpu_bench.case_row("plain", 1000, 3000.0, dict.fromkeys(gpu_bench.METHOD_NAMES, 1.0),
                               dict.fromkeys(gpu_bench.METHOD_NAMES, 1.0))
    text, failed = gpu_bench.report(rows + dmol_rows + [plain], accuracy_rows + dmol_accuracy, 3000.0, 2**30)
    assert failed == [], failed
    lines = text.splitlines()
    assert any(line.endswith("| fused variant ms | variant % of floor |") for line in lines)
    assert any(line.endswith("| fused variant host ms |") for line in lines)
    assert any(line.startswith("| plain |") and line.endswith("| - | - |") for line in lines)  # no variant
    assert any(line.startswith("| case |") and line.endswith("| fused_variant |") for line in lines)  # accuracy


@pytest.mark.parametrize("setter", ["_set_cuda_wide_loads", "_set_cuda_fast_exp", "_set_cuda_mixture_fast_math",
                                    "_set_cuda_mixture_fast_scale"])
@pytest.mark.parametrize("value", [False, True])
def test_switched_restores_the_switch(setter, value):
    switch = getattr(fusedvae._C, setter)
    before = switch(not value)
    try:
        with gpu_bench.switched((switch, value)):
            assert switch(value) is value
        assert switch(not value) is (not value)
        seen = []
        gpu_bench.with_switches(lambda: seen.append(switch(value)), (switch, value))()
        assert seen == [value] and switch(not value) is (not value)
    finally:
        switch(before)


def test_switched_sets_several_switches():
    wide, fast_math = fusedvae._C._set_cuda_wide_loads, fusedvae._C._set_cuda_mixture_fast_math
    before = wide(False), fast_math(True)
    try:
        with gpu_bench.switched((wide, True), (fast_math, False)):
            assert wide(True) is True and fast_math(False) is False
        assert wide(False) is False  # each back to its own previous setting
        assert fast_math(True) is True
    finally:
        wide(before[0]), fast_math(before[1])
