"""benchmarks/sanitizer_case.py, which gpu_check.sh runs under compute-sanitizer, runs on every device."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).with_name("sanitizer_case.py")
REPO = SCRIPT.parent.parent


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_sanitizer_case_runs(device):
    # As gpu_check.sh runs it: the repository root first on the path, so that an
    # in-place build (no pip install) imports too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(SCRIPT), device], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ok"
