"""The cases gpu_check.sh runs under its tools run on every device:
benchmarks/sanitizer_case.py (compute-sanitizer) and benchmarks/profile_case.py
(Nsight Compute)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent


@pytest.mark.parametrize("script", ["sanitizer_case.py", "profile_case.py"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_case_runs(device, script):
    # As gpu_check.sh runs it: the repository root first on the path, so that an
    # in-place build (no pip install) imports too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(HERE / script), device], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ok"
