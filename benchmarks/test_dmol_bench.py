"""The discretized-mixture benchmark (fusedvae.bench.run_dmol_case, and
benchmarks/dmol_bench.py over it): it runs, its ratios are its medians', and
its accuracy check catches a wrong method."""
import importlib.util
import os

from fusedvae import bench, reference

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmol_bench.py")


def test_run_dmol_case_times_every_method_and_checks_it():
    r = bench.run_dmol_case(2, 8, repeats=3, warmup=0)
    assert r["case"] == "B2x3x8x8-K10"
    assert set(r["ms"]) == set(bench.DMOL_METHODS)
    assert all(len(v) == 3 and min(v) > 0 for v in r["times_ms"].values())
    assert r["ratio"]["eager/fused"] == r["ms"]["eager"] / r["ms"]["fused"]
    assert all(a["ok"] for a in r["accuracy"].values()), r["accuracy"]
    table = bench.format_dmol_results([r])
    assert f"| B2x3x8x8-K10 | {r['ms']['eager']:.3f} |" in table


def test_accuracy_check_catches_a_wrong_method():
    params, target = bench.make_dmol_inputs(1, 4)
    wrong = bench._dmol_accuracy(lambda p, t: reference.discretized_mix_logistic_nll(p, t) * 1.001, params, target)
    assert not wrong["ok"] and wrong["nll_rel"] > 5e-4


def test_script_quick_run(capsys):
    spec = importlib.util.spec_from_file_location("dmol_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--repeats", "2"]) == 0
    assert "| B2x3x8x8-K10 |" in capsys.readouterr().out
