"""Argument checks shared by the schedules, controllers and diagnostics.

Each error names the argument and says what was expected.
"""
from __future__ import annotations

import math
import numbers

from torch import Tensor


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    # float and int first: the check of the numbers.Real ABC costs several times
    # more, and vae_loss makes it on every call (beta, free_bits).
    kind = type(value)
    if kind is float or kind is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(value, name: str) -> int:
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_finite(value, name: str) -> float:
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive(value, name: str) -> float:
    value = check_finite(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_nonnegative(value, name: str) -> float:
    value = check_finite(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def rec_kl(out):
    """The per-sample ``rec`` and ``kl`` of a VAELossOutput (TypeError for anything else)."""
    rec, kl = getattr(out, "rec", None), getattr(out, "kl", None)
    if not isinstance(rec, Tensor) or not isinstance(kl, Tensor):
        raise TypeError(f"out must be a VAELossOutput with tensors rec and kl, got {type(out).__name__}")
    return rec, kl
