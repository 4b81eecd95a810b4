"""benchmarks/dmol_bench.py runs, and every method it times agrees with the float64 reference."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmol_bench.py")


def _module():
    spec = importlib.util.spec_from_file_location("dmol_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_every_method_and_agrees_with_reference(capsys):
    assert _module().main(["--quick", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 2x3x8x8")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    ms = [float(c) for c in cells[1:4]]
    assert all(m > 0 for m in ms)
    # the ratio of the unrounded medians, which the printed ones (to 0.005 ms) bound
    ratio = float(cells[4].rstrip("x"))
    low = (ms[0] - 0.005) / (ms[2] + 0.005) - 0.005
    high = (ms[0] + 0.005) / max(ms[2] - 0.005, 1e-9) + 0.005
    assert low <= ratio <= high, (ratio, ms)


def test_check_catches_a_wrong_method():
    m = _module()
    params, target = m.make_inputs(1, 4, "cpu")
    wrong = m.check("wrong", lambda p, t: m.reference.discretized_mix_logistic_nll(p, t) * 1.001, params, target)
    right = m.check("fused", m.fusedvae.discretized_mix_logistic_nll, params, target)
    assert not wrong["ok"] and right["ok"]
    assert right["nll_rel"] < 2e-5 and right["grad_rel"] < 1e-4


@pytest.mark.parametrize("side", [8])
def test_inputs_hold_k_10_components(side):
    params, target = _module().make_inputs(2, side, "cpu")
    assert params.shape == (2, 100, side, side) and target.shape == (2, 3, side, side)
