"""Fixtures for the fusedvae test suite (shared helpers are in helpers.py)."""
from __future__ import annotations

import pytest
import torch

from fusedvae.bench import isolate_inductor_cache
from helpers import DEVICES

# CI runs the core tests again at each lower CPU capability (ATEN_CPU_CAPABILITY),
# and inductor's cache does not tell one capability's code from another's: a
# torch.compile test there was served the default capability's code and got
# wrong gradients. Each capability compiles into a cache folder of its own.
isolate_inductor_cache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a device-specific test runs on: "cpu" always, "cuda" where a GPU is present."""
    return request.param


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test; the flag and the thread count are restored."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache and counters before and after a torch.compile test."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
