"""Generates cb_log_normalizer_table.npz: exact values of the continuous-Bernoulli
log-normaliser and its derivative, for tests/test_cb_normalizer.py.

    log C(η) = log(η / tanh(η/2)),  C(0) = 2
    d log C / dη = 1/η - 1/sinh(η),  0 at η = 0

For each input dtype (float32, float64, float16, bfloat16) a grid of η values that
are exactly representable in that dtype, covering its whole finite range (both
signs, 0, subnormals, log-spaced magnitudes up to the largest finite value, a
dense stretch around the series/closed-form switch of csrc/vae_math.h and random
bit patterns), and for each η the two functions evaluated by mpmath from the
exact input value at mp.dps = 50 significant digits. 1/η - 1/sinh(η) cancels by
a factor of about η²/6 for small |η|, so the working precision is raised by
2·log10(1/|η|) digits there; every value is computed twice, at two precisions
20 digits apart, and checked to agree, and small arguments are also checked
against the Taylor series written with mpmath's Bernoulli numbers.

Stored arrays (npz, compressed), for each section S in f32, f64, f16, bf16:
    S_eta        the inputs (float32 for f32/f16/bf16, which holds them exactly; float64 for f64)
    S_value      log C(η) rounded to float64
    S_grad       d log C/dη rounded to float64
and for f64 additionally
    f64_value_lo, f64_grad_lo   the remainders exact - hi rounded to float64, so that
                                hi + lo carries ~32 significant digits.

Run from the repository root:  python tests/data/make_cb_table.py
"""
from __future__ import annotations

import os

import mpmath as mp
import numpy as np
import torch

DPS = 50
SEED = 20240611
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "cb_log_normalizer_table.npz")


# ------------------------------------------------------------ exact values --


def _eval(a: mp.mpf, dps: int):
    """log C and d log C/dη at a > 0, with `dps` digits plus what the cancellation eats."""
    extra = 10
    if a < 1:
        extra += int(2 * mp.log10(1 / a)) + 2
    with mp.workdps(dps + extra):
        a = +a
        value = mp.log(a / mp.tanh(a / 2))
        grad = 1 / a - 1 / mp.sinh(a)
    return value, grad


def _series(a: mp.mpf, terms: int = 40):
    """The Taylor series of both functions at 0 (radius 2π), for a cross-check."""
    value = mp.log(2)
    grad = mp.mpf(0)
    for n in range(1, terms + 1):
        c = (mp.mpf(2) ** (2 * n) - 2) * abs(mp.bernoulli(2 * n)) / mp.factorial(2 * n)
        sign = 1 if n % 2 else -1
        value += sign * c * a ** (2 * n) / (2 * n)
        grad += sign * c * a ** (2 * n - 1)
    return value, grad


def exact(x: float):
    """(log C(x), d log C/dx(x)) as mpf, at the exact binary value of x."""
    if x == 0:
        with mp.workdps(DPS):
            return +mp.log(2), mp.mpf(0)
    a = abs(mp.mpf(x))  # mpf(float) is exact
    value, grad = _eval(a, DPS)
    value2, grad2 = _eval(a, DPS + 20)
    tol = mp.mpf(10) ** (-(DPS - 2))
    assert abs(value - value2) <= tol * abs(value2), x
    assert abs(grad - grad2) <= tol * abs(grad2), x
    if a < mp.mpf("0.5"):
        with mp.workdps(DPS + 10):
            sv, sg = _series(a)
        assert abs(value - sv) <= tol * abs(sv), x
        assert abs(grad - sg) <= tol * abs(sg), x
    if x < 0:
        grad = -grad
    return value, grad


def hi_lo(v: mp.mpf):
    with mp.workdps(DPS + 20):
        hi = float(v)  # round to nearest
        lo = float(v - mp.mpf(hi))
    return hi, lo


# ------------------------------------------------------------------- grids --


def _bits_to(dtype, bits):
    """Values of a float dtype from their bit patterns (non-negative int array)."""
    int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    t = torch.tensor(np.asarray(bits, dtype=np.int64)).to(int_dtype).view(dtype)
    return t.double().numpy()


def _neighbours(x: float, dtype, k: int):
    """The 2k+1 representable values of dtype around x (x itself rounded to dtype)."""
    int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    b = int(torch.tensor([x], dtype=torch.float64).to(dtype).view(int_dtype).item())
    return _bits_to(dtype, np.arange(b - k, b + k + 1))


def _logspace(lo, hi, n):
    return np.exp(np.linspace(np.log(lo), np.log(hi), n))


def _finish(dtype, positives, rng_bits):
    """Round to dtype, keep finite non-negative values, add random bit patterns and
    the mirror images, and sort. -0.0 is included next to 0.0."""
    fi = torch.finfo(dtype)
    v = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in positives])
    v = torch.tensor(v).to(dtype).double().numpy()  # now representable
    v = np.concatenate([v, _bits_to(dtype, rng_bits)])
    v = v[np.isfinite(v) & (v >= 0) & (v <= fi.max)]
    v = np.unique(v)
    v = v[v > 0]
    grid = np.concatenate([-v[::-1], [-0.0, 0.0], v])
    assert np.all(torch.tensor(grid).to(dtype).double().numpy() == grid)
    return grid


def grid_f32(rng):
    d = torch.float32
    fi = torch.finfo(d)
    sub_min = 2.0 ** -149
    pos = [
        _logspace(sub_min, fi.tiny, 40),                        # subnormals
        [sub_min, 2 * sub_min, 3 * sub_min, fi.tiny - sub_min, fi.tiny],
        _logspace(fi.tiny, 1e-30, 60),
        _logspace(1e-30, 1e-8, 150),                           # series, η² underflows below ~1e-19
        _logspace(1e-8, 1e-3, 80),
        _logspace(1e-3, 1e3, 400),
        np.linspace(0.3, 1.5, 500),                            # around the float switch (1.0)
        _neighbours(1.0, d, 16), _neighbours(0.35, d, 8),
        np.linspace(80.0, 95.0, 150),                          # sinhf overflows at ~89.42
        _neighbours(89.41598, d, 8),
        _logspace(1e3, float(fi.max), 250),
        [float(fi.max)], _neighbours(float(fi.max), d, 4)[:5],
    ]
    bits = rng.integers(1, 0x7F800000, size=800)               # positive finite float32
    return _finish(d, pos, bits)


def grid_f64(rng):
    d = torch.float64
    fi = torch.finfo(d)
    sub_min = 2.0 ** -1074
    pos = [
        _logspace(sub_min, fi.tiny, 40),
        [sub_min, 2 * sub_min, 3 * sub_min, fi.tiny - sub_min, fi.tiny],
        _logspace(fi.tiny, 1e-30, 200),
        _logspace(1e-30, 1e-8, 150),
        _logspace(1e-8, 1e-3, 80),
        _logspace(1e-3, 1e3, 400),
        np.linspace(0.2, 0.6, 400),                            # around the double switch (0.35)
        np.linspace(0.6, 1.5, 150),
        _neighbours(0.35, d, 16), _neighbours(1.0, d, 8),
        np.linspace(700.0, 720.0, 100),                        # sinh overflows at ~710.48
        _neighbours(710.4758600739439, d, 8),
        _logspace(1e3, float(fi.max), 300),
        [float(fi.max)], _neighbours(float(fi.max), d, 4)[:5],
    ]
    bits = rng.integers(1, 0x7FF0000000000000, size=800, dtype=np.int64)
    return _finish(d, pos, bits)


def grid_low(dtype, stride_all, stride_dense):
    """float16 / bfloat16: every stride_all-th positive finite bit pattern, every
    stride_dense-th one in [0.3, 1.5], and the extremes."""
    fi = torch.finfo(dtype)
    inf_bits = 0x7C00 if dtype == torch.float16 else 0x7F80
    all_pos = _bits_to(dtype, np.arange(1, inf_bits))
    dense = all_pos[(all_pos >= 0.3) & (all_pos <= 1.5)][::stride_dense]
    pos = [all_pos[::stride_all], dense, all_pos[:4], all_pos[-4:], [float(fi.tiny), 1.0]]
    return _finish(dtype, pos, np.array([], dtype=np.int64))


# -------------------------------------------------------------------- main --


def tabulate(grid, with_lo: bool):
    value = np.empty(len(grid))
    grad = np.empty(len(grid))
    value_lo = np.empty(len(grid))
    grad_lo = np.empty(len(grid))
    for i, x in enumerate(grid):
        v, g = exact(float(x))
        value[i], value_lo[i] = hi_lo(v)
        grad[i], grad_lo[i] = hi_lo(g)
        if x == 0:
            grad[i] = grad_lo[i] = 0.0
    out = {"value": value, "grad": grad}
    if with_lo:
        out.update(value_lo=value_lo, grad_lo=grad_lo)
    return out


def main():
    mp.mp.dps = DPS
    rng = np.random.default_rng(SEED)
    sections = {
        "f32": (grid_f32(rng), np.float32, False),
        "f64": (grid_f64(rng), np.float64, True),
        "f16": (grid_low(torch.float16, 16, 4), np.float32, False),
        "bf16": (grid_low(torch.bfloat16, 16, 1), np.float32, False),
    }
    arrays = {"dps": np.array(DPS)}
    for name, (grid, eta_dtype, with_lo) in sections.items():
        eta = grid.astype(eta_dtype)
        assert np.array_equal(eta.astype(np.float64), grid)  # stored exactly
        arrays[f"{name}_eta"] = eta
        for key, arr in tabulate(grid, with_lo).items():
            arrays[f"{name}_{key}"] = arr
        print(f"{name}: {len(grid)} points, |eta| in [{np.abs(grid[grid != 0]).min():.3g}, "
              f"{np.abs(grid).max():.4g}]")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
