"""The float32 approximations the CPU kernels evaluate instead of library calls,
measured against mpmath over the whole range of their input.

Each is run exactly as the kernels in use run it (``fusedvae._C._cpu_float_math``
calls the build of ``fusedvae._C.cpu_kernels``; CI repeats this file on every
lower build), on float32 values spread evenly by bit pattern over the range
(every magnitude, every mantissa region), and its largest relative error is
asserted below the bound stated here, which is what the kernels' comments and
docs quote:

- ``exp_nonpositive`` (e^x for x in [-87.3365, 0], csrc/cpu/vec_ops.h): relative
  error below 2.5e-7 (about 2 float32 ulps); exactly 1 at 0, 0 below -87.3365.
- ``log1p_unit`` (log(1 + e) for e in [0, 1], csrc/vae_math.h): relative error
  below 2.5e-7 for normal e (>= 2^-126); within one subnormal step (2^-149) of
  log1p(e) = e below.
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

from fusedvae import _C

X_MIN = -87.33654475  # log(2^-126): below it exp_nonpositive returns 0
TINY = float(np.finfo(np.float32).tiny)  # 2^-126, the smallest normal float32


def _run(name: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.frombuffer(_C._cpu_float_math(name, x.tobytes()), dtype=np.float32).copy()


def _floats_between(lo: float, hi: float, count: int) -> np.ndarray:
    """``count`` float32 values from lo to hi (same sign, inclusive), evenly spaced
    in bit pattern, so every binade gets its share."""
    a, b = np.array([lo, hi], dtype=np.float32).view(np.int32).astype(np.int64)
    bits = np.unique(np.linspace(min(a, b), max(a, b), count).round().astype(np.int64))
    return bits.astype(np.int32).view(np.float32)


def _mpmath_relative_error(got: np.ndarray, x: np.ndarray, f) -> np.ndarray:
    mpmath.mp.prec = 80
    exact = np.array([float(f(mpmath.mpf(float(v)))) for v in x])
    return np.abs(got.astype(np.float64) - exact) / np.abs(exact)


# Points per function: mpmath evaluates each (about a second per 100k).
POINTS = 1 << 17


def test_exp_nonpositive_relative_error():
    x = np.concatenate([_floats_between(-1e-30, X_MIN, POINTS), np.float32([-0.0, -1e-45])])
    x = x[x >= np.float32(X_MIN)]
    err = _mpmath_relative_error(_run("exp_nonpositive", x), x, mpmath.exp)
    worst = int(np.argmax(err))
    assert err.max() < 2.5e-7, f"max relative error {err.max():.3g} at x = {x[worst]!r}"
    # and it is not a loose bound: the polynomial's error is a float32 ulp or so
    assert err.max() > 3e-8


def test_exp_nonpositive_special_values():
    x = np.float32([0.0, -0.0, -87.34, -88.0, -100.0, -3.4e38, -np.inf, np.nan])
    got = _run("exp_nonpositive", x)
    assert got[0] == 1.0 and got[1] == 1.0
    assert (got[2:7] == 0.0).all(), got
    assert np.isnan(got[7])


def test_exp_nonpositive_every_lane_and_tail():
    # Lengths around every vector width: each lane, and a partial last vector.
    for n in range(1, 40):
        x = -np.linspace(0, 20, n, dtype=np.float32)
        np.testing.assert_allclose(_run("exp_nonpositive", x), np.exp(x.astype(np.float64)), rtol=2.5e-7)


def test_log1p_unit_relative_error():
    e = np.concatenate([_floats_between(TINY, 1.0, POINTS), np.float32([TINY, 1.0])])
    err = _mpmath_relative_error(_run("log1p_unit", e), e, mpmath.log1p)
    worst = int(np.argmax(err))
    assert err.max() < 2.5e-7, f"max relative error {err.max():.3g} at e = {e[worst]!r}"
    assert err.max() > 3e-8


def test_log1p_unit_subnormal():
    e = _floats_between(1e-45, 1.1e-38, 4096)
    got = _run("log1p_unit", e)
    assert np.abs(got.astype(np.float64) - e.astype(np.float64)).max() <= 2.0**-149


def test_log1p_unit_at_zero_and_nan():
    got = _run("log1p_unit", np.float32([0.0, np.nan]))
    assert got[0] == 0.0 and np.isnan(got[1])


def test_unknown_name_and_bad_buffer():
    with pytest.raises(ValueError, match="expected name to be 'exp_nonpositive' or 'log1p_unit'"):
        _C._cpu_float_math("exp", b"\0\0\0\0")
    with pytest.raises(ValueError, match="float32"):
        _C._cpu_float_math("exp_nonpositive", b"\0\0\0")
