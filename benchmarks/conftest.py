"""Benchmark session setup: name the machine in the report and in saved results."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

# The extension is built in place (setup.py build_ext --inplace) rather than
# installed: make the checkout importable when pytest is run as `pytest`.
if importlib.util.find_spec("fusedvae") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_report_header(config):
    from fusedvae import bench

    info = bench.machine_info()
    return (
        f"fusedvae bench: {info['cpu_model']} ({info['cpu_count']} logical CPUs), "
        f"torch threads {info['torch_threads']}, CPU capability {info['cpu_capability']}, "
        f"torch {info['torch']}"
    )


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark may be absent
def pytest_benchmark_update_machine_info(config, machine_info):
    from fusedvae import bench

    machine_info["fusedvae"] = bench.machine_info()
