"""The float32 approximations the CPU kernels evaluate instead of library calls,
measured against mpmath over the whole range of their input.

Each is run exactly as the kernels in use run it (``fusedvae._C._cpu_float_math``
calls the build of ``fusedvae._C.cpu_kernels``; CI repeats this file on every
lower build), on float32 values spread evenly by bit pattern over the range
(every magnitude, every mantissa region), and its largest relative error is
asserted below the bound stated here, which is what the kernels' comments and
docs quote (measured maxima in brackets, 2^17 points):

- ``exp_nonpositive`` (e^x for x in [-87.3365, 0], csrc/cpu/vec_ops.h): relative
  error below 2.5e-7 [1.1e-7] (about 2 float32 ulps); exactly 1 at 0, 0 below
  -87.3365.
- ``log1p_unit`` (log(1 + e) for e in [0, 1], csrc/vae_math.h): relative error
  below 2.5e-7 [1.9e-7] for normal e (>= 2^-126); within one subnormal step
  (2^-149) of log1p(e) = e below.
- ``sigmoid`` (1/(1 + e^-x), the Bernoulli logits' gradient: math::sigmoid_from
  of exp_nonpositive(-|x|)): relative error below 2.5e-7 [1.8e-7] wherever
  sigmoid(x) is a normal float (x >= -87.3365), 0 below; exactly 1/2 at 0, 1
  from x = 17.33 on. (A reciprocal estimate refined by a Newton step in place of
  its division, and of log1p_unit's, made the forward 17 % slower on an AVX-512
  and an AVX2 build here: the divider runs beside the FMA units, the Newton
  step on them.)

On every device, through the op: the Bernoulli-logits loss (softplus) and its
gradient (sigmoid), whose CUDA kernels divide by 1 + e and 2 + e with a
reciprocal estimate and one correction (``math::ScalarOps<float>::divide_1_4``):
relative error over [-80, 80] below 2.5e-7 on the CPU, and on CUDA below 6e-7,
the sum of the stated maxima of expf (2 ulps) and the rest.

The discretized mixture's (csrc/dmol.h):

- ``exp_approx`` (e^x for every x, csrc/cpu/vec_ops.h): relative error below
  1.5e-7 [7.5e-8] wherever e^x is a normal float, x in [-87.3365, 88.7228];
  within one subnormal step below; 0 below -103.98, inf above 88.7229.
- ``expm1_nonpositive`` (e^x - 1 for x <= 0): relative error below 1.5e-7
  [7.6e-8] over [-30, 0] down to the subnormals, where it is x itself; -1 below.
- ``expm1_approx`` (e^x - 1 for every x, the KL's): relative error below 1.5e-7
  [1.0e-7] over [-30, 88.72], subnormals included, where it is x itself; -1 below -17.33,
  inf above 88.7229.
- ``log_approx`` (log x for x > 0): relative error below 1.5e-7 [7.7e-8] for
  every positive float, subnormals included; -inf at 0, NaN below, inf at inf.
- ``tanh_approx`` (tanh x for every x): relative error below 2.5e-7 [1.5e-7];
  odd, exactly ±1 beyond ±9.1.
- ``log_product3`` (log(a·b·c) for a, b, c >= 0, a component's three channel
  probabilities; run as log_product3(x, x, x) against 3·log x, which puts the
  product of the reduced mantissas over its whole range): error below
  1.5e-7·|log| + 1.2e-7 [1.0e-7 beyond the relative part], for every positive
  float, subnormals included; -inf where a factor is 0, NaN where one is NaN.
  Three log_approx calls err by up to 1.5e-7·|log| each.
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

import fusedvae
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
    with mpmath.workprec(80):  # mpmath's precision is global: set only here
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


def test_sigmoid_relative_error():
    x = np.concatenate([_floats_between(-1e-30, X_MIN, POINTS // 2), _floats_between(1e-30, 40.0, POINTS // 2),
                        np.float32([0.0, X_MIN, 40.0])])
    x = x[x >= np.float32(X_MIN)]
    err = _mpmath_relative_error(_run("sigmoid", x), x, lambda v: 1 / (1 + mpmath.exp(-v)))
    worst = int(np.argmax(err))
    assert err.max() < 2.5e-7, f"max relative error {err.max():.3g} at x = {x[worst]!r}"
    assert err.max() > 3e-8


def test_sigmoid_special_values():
    got = _run("sigmoid", np.float32([0.0, -0.0, 17.33, 100.0, np.inf, -88.0, -np.inf, np.nan]))
    assert got[0] == 0.5 and got[1] == 0.5
    assert got[2] == 1.0 and got[3] == 1.0 and got[4] == 1.0
    assert got[5] == 0.0 and got[6] == 0.0 and np.isnan(got[7])


def test_logits_loss_and_sigmoid_on_device(device):
    # The float32 kernels' Bernoulli-logits loss (t = 0: softplus(x) = max(x, 0) +
    # log1p(e^-|x|)) and its gradient sigmoid(x), one element per sample, against
    # float64. On the CPU as above (measured: below 2.5e-7). On CUDA both divide
    # by 1 + e or 2 + e through math::ScalarOps<float>::divide_1_4 (a reciprocal
    # estimate and one correction, taken as 1 ulp) beside expf, which the CUDA
    # Math API bounds by 2 ulps: the bound there is the sum, 5 ulps (6e-7).
    x = np.concatenate([_floats_between(-1e-30, -80.0, POINTS // 4), _floats_between(1e-30, 80.0, POINTS // 4),
                        np.float32([0.0])])
    recon = torch.from_numpy(x).view(-1, 1).to(device).requires_grad_()
    mu = torch.zeros(len(x), 1, device=device)
    out = fusedvae.vae_loss(recon, torch.zeros_like(recon), mu, mu, likelihood="bernoulli", reduction="none")
    (grad,) = torch.autograd.grad(out.rec.sum(), recon)
    exact = torch.from_numpy(x).double()
    for name, got, expected in [("softplus", out.rec, torch.nn.functional.softplus(exact)),
                                ("sigmoid", grad.view(-1), torch.sigmoid(exact))]:
        err = ((got.detach().cpu().double() - expected).abs() / expected).numpy()
        worst = int(np.argmax(err))
        bound = 2.5e-7 if device == "cpu" else 6e-7
        assert err.max() < bound, f"{name}: max relative error {err.max():.3g} at x = {x[worst]!r}"


EXP_MAX = 88.72283  # the largest float32 x with e^x below FLT_MAX (log FLT_MAX = 88.7228391)
EXP_UNDERFLOW = -103.972  # below it e^x < 2^-150: rounds to 0


def _assert_relative_error(name, x, f, bound):
    err = _mpmath_relative_error(_run(name, x), x, f)
    worst = int(np.argmax(err))
    assert err.max() < bound, f"{name}: max relative error {err.max():.3g} at x = {x[worst]!r}"
    # and it is not a loose bound
    assert err.max() > bound / 8


def test_exp_approx_relative_error():
    x = np.concatenate([_floats_between(-1e-30, X_MIN, POINTS // 2), _floats_between(1e-30, EXP_MAX, POINTS // 2),
                        np.float32([0.0, X_MIN, EXP_MAX])])
    _assert_relative_error("exp_approx", x, mpmath.exp, 1.5e-7)


def test_exp_approx_subnormal_and_special_values():
    x = _floats_between(X_MIN, EXP_UNDERFLOW, 4096)
    exact = np.exp(x.astype(np.float64))
    assert np.abs(_run("exp_approx", x).astype(np.float64) - exact).max() <= 2.0**-149
    x = np.float32([0.0, -0.0, 88.7229, 89.0, 1e30, np.inf, -103.98, -104.0, -1e30, -np.inf, np.nan])
    got = _run("exp_approx", x)
    assert got[0] == 1.0 and got[1] == 1.0
    assert np.isposinf(got[2:6]).all(), got
    assert (got[6:10] == 0.0).all(), got
    assert np.isnan(got[10])


def test_expm1_nonpositive_relative_error():
    x = np.concatenate([_floats_between(-TINY, -30.0, POINTS), np.float32([-30.0])])
    _assert_relative_error("expm1_nonpositive", x, mpmath.expm1, 1.5e-7)


def test_expm1_nonpositive_special_values():
    sub = -_floats_between(1e-45, 1.1e-38, 256)
    np.testing.assert_array_equal(_run("expm1_nonpositive", sub), sub)
    got = _run("expm1_nonpositive", np.float32([0.0, -0.0, -17.4, -30.0, -100.0, -np.inf, np.nan]))
    assert got[0] == 0.0 and got[1] == 0.0
    assert (got[2:6] == -1.0).all(), got
    assert np.isnan(got[6])


def test_expm1_approx_relative_error():
    x = np.concatenate([_floats_between(-TINY, -30.0, POINTS // 2), _floats_between(TINY, 88.72, POINTS // 2),
                        np.float32([-30.0, 15.999999, 16.0, 88.72])])
    _assert_relative_error("expm1_approx", x, mpmath.expm1, 1.5e-7)


def test_expm1_approx_special_values():
    sub = _floats_between(1e-45, 1.1e-38, 256)
    np.testing.assert_array_equal(_run("expm1_approx", sub), sub)
    np.testing.assert_array_equal(_run("expm1_approx", -sub), -sub)
    got = _run("expm1_approx", np.float32([0.0, -0.0, -17.4, -30.0, -100.0, -np.inf, 88.73, 89.0, 1e30,
                                           np.inf, np.nan]))
    assert got[0] == 0.0 and got[1] == 0.0
    assert (got[2:6] == -1.0).all(), got
    assert np.isposinf(got[6:10]).all(), got
    assert np.isnan(got[10])


def test_log_approx_relative_error():
    # log 1 = 0 exactly: the relative error is taken on either side of it
    x = np.concatenate([_floats_between(2.0**-149, 0.99999994, POINTS // 2),
                        _floats_between(1.0000001, float(np.finfo(np.float32).max), POINTS // 2)])
    _assert_relative_error("log_approx", x, mpmath.log, 1.5e-7)


def test_log_approx_special_values():
    got = _run("log_approx", np.float32([1.0, 0.0, -0.0, -1e-45, -1.0, -np.inf, np.inf, np.nan]))
    assert got[0] == 0.0
    assert np.isneginf(got[1:3]).all(), got
    assert np.isnan(got[3:6]).all(), got
    assert np.isposinf(got[6]) and np.isnan(got[7])


def test_log_product3_error():
    # 3·log x is 0 at x = 1, where the product's rounding (an ulp of 1) is the
    # error: the bound is relative plus that absolute part.
    x = np.concatenate([_floats_between(2.0**-149, 0.99999994, POINTS // 2),
                        _floats_between(1.0000001, float(np.finfo(np.float32).max) ** (1 / 3), POINTS // 2)])
    with mpmath.workprec(80):
        exact = np.array([float(3 * mpmath.log(mpmath.mpf(float(v)))) for v in x])
    err = np.abs(_run("log_product3", x).astype(np.float64) - exact)
    excess = err - 1.5e-7 * np.abs(exact)
    worst = int(np.argmax(excess))
    assert excess.max() <= 1.2e-7, f"error {err[worst]:.3g} at x = {x[worst]!r}"
    assert excess.max() > 2e-8  # not a loose bound


def test_log_product3_special_values():
    got = _run("log_product3", np.float32([1.0, 0.0, -0.0, np.nan]))
    assert got[0] == 0.0
    assert np.isneginf(got[1:3]).all(), got
    assert np.isnan(got[3])


def test_tanh_approx_relative_error():
    x = np.concatenate([_floats_between(1e-38, 12.0, POINTS // 2), _floats_between(-1e-38, -12.0, POINTS // 2)])
    _assert_relative_error("tanh_approx", x, mpmath.tanh, 2.5e-7)


def test_tanh_approx_special_values():
    x = np.float32([0.0, -0.0, 1e-45, -1e-45, 9.1, -9.1, 100.0, np.inf, -np.inf, np.nan])
    got = _run("tanh_approx", x)
    np.testing.assert_array_equal(got[:4], x[:4])
    assert np.signbit(got[1]) and np.signbit(got[3])
    np.testing.assert_array_equal(got[4:9], np.float32([1, -1, 1, 1, -1]))
    assert np.isnan(got[9])


@pytest.mark.parametrize("name,lo,hi,exact", [
    ("exp_approx", -20.0, 20.0, np.exp),
    ("expm1_nonpositive", -20.0, 0.0, np.expm1),
    ("expm1_approx", -20.0, 40.0, np.expm1),
    ("log_approx", 0.01, 20.0, np.log),
    ("tanh_approx", -20.0, 20.0, np.tanh),
    ("sigmoid", -80.0, 40.0, lambda v: 1 / (1 + np.exp(-v))),
    ("log_product3", 1.5, 20.0, lambda v: 3 * np.log(v)),  # away from 1, where its error is absolute
])
def test_approx_every_lane_and_tail(name, lo, hi, exact):
    # Lengths around every vector width: each lane, and a partial last vector.
    for n in range(1, 40):
        x = np.linspace(lo, hi, n, dtype=np.float32)
        np.testing.assert_allclose(_run(name, x), exact(x.astype(np.float64)), rtol=2.5e-7, atol=1e-30)


def test_unknown_name_and_bad_buffer():
    with pytest.raises(ValueError, match="expected name to be one of 'exp_nonpositive', 'log1p_unit', 'exp_approx'"):
        _C._cpu_float_math("exp", b"\0\0\0\0")
    with pytest.raises(ValueError, match="float32"):
        _C._cpu_float_math("exp_nonpositive", b"\0\0\0")
