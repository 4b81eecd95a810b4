"""The bad-input matrix, and docs/errors.md generated from it.

Every argument of ``vae_loss`` with a wrong type, shape, dtype, device (the
'meta' device stands in for another device) or range raises ``TypeError`` or
``ValueError`` with a message that names the argument. Direct calls of each
``torch.ops.fusedvae`` op with bad shapes, dtypes or likelihood strings raise
(``RuntimeError`` or a subclass) and never crash the process: the whole op table
is also run in a fresh subprocess, which must exit normally.

The same kinds of mistake are also tried on image-shaped inputs, for the module
and for direct op calls, at the end of this file.

docs/errors.md is this matrix as tables. ``test_errors_md_is_current`` asserts
that the file is exactly what the matrix generates, and every row is asserted to
be what actually happens; after changing the matrix regenerate the file with::

    python tests/test_errors.py
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedvae
from fusedvae import reference
from helpers import make_inputs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOC = os.path.join(_ROOT, "docs", "errors.md")
ops = torch.ops.fusedvae
META = torch.device("meta")


def _good():
    g = torch.Generator().manual_seed(0)
    recon = torch.randn(3, 2, 4, generator=g)
    target = torch.rand(3, 2, 4, generator=g)
    mu = torch.randn(3, 5, generator=g)
    logvar = torch.randn(3, 5, generator=g)
    return recon, target, mu, logvar


def _call(fn, **change):
    """Call ``fn`` with the good arguments, some of them replaced."""
    r, t, m, lv = _good()
    args = dict(recon=r, target=t, mu=m, logvar=lv)
    kwargs = {}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v(args) if callable(v) else v
    return fn(args["recon"], args["target"], args["mu"], args["logvar"], **kwargs)


# (argument, bad value as written in the table, changes to the good call, exception, message fragment)
VAE_LOSS_CASES = [
    ("recon", "a list", dict(recon=lambda a: a["recon"].tolist()), TypeError, "recon must be a torch.Tensor"),
    ("recon", "a numpy array", dict(recon=lambda a: a["recon"].numpy()), TypeError, "recon must be a torch.Tensor"),
    ("recon", "int64 tensor", dict(recon=lambda a: a["recon"].long()), TypeError, "recon must be a floating-point tensor"),
    ("recon", "bool tensor", dict(recon=lambda a: a["recon"] > 0), TypeError, "recon must be a floating-point tensor"),
    ("recon", "complex64 tensor", dict(recon=lambda a: a["recon"].to(torch.complex64)), TypeError, "recon must be a floating-point tensor"),
    ("recon", "0-d tensor", dict(recon=torch.tensor(0.5)), ValueError, "recon must have shape [batch, ...]"),
    ("recon", "on 'meta' (the rest on the CPU)", dict(recon=lambda a: a["recon"].to(META)), ValueError, "target must be on the device of recon"),
    ("recon", "probabilities outside [0, 1], `logits=False, validate=True`", dict(recon=lambda a: a["recon"] + 2, logits=False, validate=True), ValueError, "recon must hold probabilities in [0, 1]"),
    ("target", "None", dict(target=None), TypeError, "target must be a torch.Tensor"),
    ("target", "int32 tensor", dict(target=lambda a: a["target"].int()), TypeError, "target must be a floating-point, uint8 or bool tensor"),
    ("target", "complex64 tensor", dict(target=lambda a: a["target"].to(torch.complex64)), TypeError, "target must be a floating-point, uint8 or bool tensor"),
    ("target", "another shape", dict(target=lambda a: a["target"][:, :1]), ValueError, "target must have the shape of recon"),
    ("target", "the same elements in another shape", dict(target=lambda a: a["target"].reshape(3, 4, 2)), ValueError, "target must have the shape of recon"),
    ("target", "on 'meta'", dict(target=lambda a: a["target"].to(META)), ValueError, "target must be on the device of recon"),
    ("target", "requires grad", dict(target=lambda a: a["target"].clone().requires_grad_()), ValueError, "target must not require grad"),
    ("target", "outside [0, 1], `validate=True`", dict(target=lambda a: a["target"] + 1.5, validate=True), ValueError, "target must lie in [0, 1]"),
    ("target", "NaN, `likelihood='cbernoulli', validate=True`", dict(target=lambda a: a["target"].fill_(float("nan")), likelihood="cbernoulli", validate=True), ValueError, "target must lie in [0, 1]"),
    ("mu", "a float", dict(mu=0.5), TypeError, "mu must be a torch.Tensor"),
    ("mu", "int32 tensor", dict(mu=lambda a: a["mu"].int()), TypeError, "mu must be a floating-point tensor"),
    ("mu", "0-d tensor", dict(mu=torch.tensor(0.0), logvar=torch.tensor(0.0)), ValueError, "mu must have shape [batch, ...]"),
    ("mu", "another batch size", dict(mu=lambda a: a["mu"][:2], logvar=lambda a: a["logvar"][:2]), ValueError, "mu must have the batch size of recon"),
    ("mu", "on 'meta'", dict(mu=lambda a: a["mu"].to(META)), ValueError, "mu must be on the device of recon"),
    ("logvar", "a tuple", dict(logvar=(0.0, 1.0)), TypeError, "logvar must be a torch.Tensor"),
    ("logvar", "int64 tensor", dict(logvar=lambda a: a["logvar"].long()), TypeError, "logvar must be a floating-point tensor"),
    ("logvar", "0-d tensor", dict(logvar=torch.tensor(0.0)), ValueError, "logvar must have shape [batch, ...]"),
    ("logvar", "another shape than mu", dict(logvar=lambda a: a["logvar"][:, :4]), ValueError, "logvar must have the shape of mu"),
    ("logvar", "on 'meta'", dict(logvar=lambda a: a["logvar"].to(META)), ValueError, "logvar must be on the device of recon"),
    ("likelihood", "'poisson'", dict(likelihood="poisson"), ValueError, "likelihood must be one of"),
    ("likelihood", "'Bernoulli' (case matters)", dict(likelihood="Bernoulli"), ValueError, "likelihood must be one of"),
    ("likelihood", "'squared_error' (an op-level name)", dict(likelihood="squared_error"), ValueError, "likelihood must be one of"),
    ("likelihood", "None", dict(likelihood=None), ValueError, "likelihood must be one of"),
    ("logits", "1", dict(logits=1), TypeError, "logits must be a bool"),
    ("logits", "'yes'", dict(logits="yes"), TypeError, "logits must be a bool"),
    ("logits", "tensor(True)", dict(logits=torch.tensor(True)), TypeError, "logits must be a bool"),
    ("beta", "-0.1", dict(beta=-0.1), ValueError, "beta must be a finite number >= 0"),
    ("beta", "nan", dict(beta=float("nan")), ValueError, "beta must be a finite number >= 0"),
    ("beta", "inf", dict(beta=float("inf")), ValueError, "beta must be a finite number >= 0"),
    ("beta", "'1.0'", dict(beta="1.0"), TypeError, "beta must be a float or a 0-d tensor"),
    ("beta", "None", dict(beta=None), TypeError, "beta must be a float or a 0-d tensor"),
    ("beta", "True", dict(beta=True), TypeError, "beta must be a float or a 0-d tensor"),
    ("beta", "tensor of shape [3]", dict(beta=torch.ones(3)), ValueError, "beta must be a float or a 0-d tensor"),
    ("beta", "int64 0-d tensor", dict(beta=torch.tensor(1)), TypeError, "beta must be a floating-point tensor"),
    ("beta", "0-d tensor on 'meta'", dict(beta=torch.tensor(1.0, device=META)), ValueError, "beta must be on the device of recon"),
    ("reduction", "'avg'", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("reduction", "None", dict(reduction=None), ValueError, "reduction must be one of"),
    ("log_scale", "0.5 with `likelihood='bernoulli'`", dict(log_scale=0.5), ValueError, "log_scale is only used with likelihood='gaussian'"),
    ("log_scale", "'bogus'", dict(likelihood="gaussian", log_scale="bogus"), ValueError, "log_scale must be a float, a tensor or 'optimal'"),
    ("log_scale", "inf", dict(likelihood="gaussian", log_scale=float("inf")), ValueError, "log_scale must be finite"),
    ("log_scale", "nan", dict(likelihood="gaussian", log_scale=float("nan")), ValueError, "log_scale must be finite"),
    ("log_scale", "a list", dict(likelihood="gaussian", log_scale=[0.0, 1.0]), TypeError, "log_scale must be a float, a tensor or 'optimal'"),
    ("log_scale", "True", dict(likelihood="gaussian", log_scale=True), TypeError, "log_scale must be a float, a tensor or 'optimal'"),
    ("log_scale", "int64 tensor", dict(likelihood="gaussian", log_scale=torch.zeros(2, 1, dtype=torch.long)), TypeError, "log_scale must be a floating-point tensor"),
    ("log_scale", "shape [5, 1] (not broadcastable)", dict(likelihood="gaussian", log_scale=torch.zeros(5, 1)), ValueError, "log_scale must be a 0-d tensor or broadcastable"),
    ("log_scale", "shape [2, 3, 2, 4] (broadcasts to more than recon)", dict(likelihood="gaussian", log_scale=torch.zeros(2, 3, 2, 4)), ValueError, "log_scale must be a 0-d tensor or broadcastable"),
    ("log_scale", "full tensor on 'meta'", dict(likelihood="gaussian", log_scale=torch.zeros(3, 2, 4, device=META)), ValueError, "log_scale must be on the device of recon"),
    ("log_scale", "0-d tensor on 'meta'", dict(likelihood="gaussian", log_scale=torch.zeros((), device=META)), ValueError, "log_scale must be on the device of recon"),
    ("free_bits", "-1.0", dict(free_bits=-1.0), ValueError, "free_bits must be a finite number >= 0"),
    ("free_bits", "nan", dict(free_bits=float("nan")), ValueError, "free_bits must be a finite number >= 0"),
    ("free_bits", "inf", dict(free_bits=float("inf")), ValueError, "free_bits must be a finite number >= 0"),
    ("free_bits", "'0.1'", dict(free_bits="0.1"), TypeError, "free_bits must be a float"),
    ("free_bits", "tensor(0.1)", dict(free_bits=torch.tensor(0.1)), TypeError, "free_bits must be a float"),
    ("free_bits", "True", dict(free_bits=True), TypeError, "free_bits must be a float"),
    ("validate", "1", dict(validate=1), TypeError, "validate must be a bool"),
    ("validate", "'yes'", dict(validate="yes"), TypeError, "validate must be a bool"),
]


def _x():
    return torch.randn(3, 4)


def _t():
    return torch.rand(3, 4)


# (op, bad input as written in the table, call, exception, message fragment)
OP_CASES = [
    ("recon_loss", "int64 recon", lambda: ops.recon_loss(_x().long(), _t(), None, "bernoulli", True), TypeError, "expected recon to be float32, float64, float16 or bfloat16"),
    ("recon_loss", "bool recon", lambda: ops.recon_loss(_x() > 0, _t(), None, "bernoulli", True), TypeError, "expected recon to be float32"),
    ("recon_loss", "complex64 recon", lambda: ops.recon_loss(_x().to(torch.complex64), _t(), None, "bernoulli", True), TypeError, "expected recon to be float32"),
    ("recon_loss", "0-d recon", lambda: ops.recon_loss(torch.tensor(0.0), torch.tensor(0.0), None, "bernoulli", True), ValueError, "expected recon of shape [batch, ...]"),
    ("recon_loss", "int32 target", lambda: ops.recon_loss(_x(), _t().int(), None, "bernoulli", True), TypeError, "expected target to be a floating-point, uint8 or bool tensor, got Int"),
    ("recon_loss", "float64 target, float32 recon", lambda: ops.recon_loss(_x(), _t().double(), None, "bernoulli", True), TypeError, "expected target of dtype Float, Half, BFloat16, Byte or Bool beside a recon of dtype Float, got Double"),
    ("recon_loss", "float32 target, float64 recon", lambda: ops.recon_loss(_x().double(), _t(), None, "bernoulli", True), TypeError, "expected target of dtype Double, Byte or Bool beside a recon of dtype Double, got Float"),
    ("recon_loss", "target of another shape", lambda: ops.recon_loss(_x(), _t()[:, :3], None, "bernoulli", True), ValueError, "expected target of shape [3, 4]"),
    ("recon_loss", "target with the same elements in another shape", lambda: ops.recon_loss(_x(), _t().reshape(4, 3), None, "bernoulli", True), ValueError, "expected target of shape [3, 4]"),
    ("recon_loss", "target on 'meta'", lambda: ops.recon_loss(_x(), _t().to(META), None, "bernoulli", True), RuntimeError, "expected target on the device of recon"),
    ("recon_loss", "recon None", lambda: ops.recon_loss(None, _t(), None, "bernoulli", True), RuntimeError, "tensor does not have a device"),
    ("recon_loss", "target None", lambda: ops.recon_loss(_x(), None, None, "bernoulli", True), ValueError, "expected target of shape [3, 4]"),
    ("recon_loss", "likelihood None", lambda: ops.recon_loss(_x(), _t(), None, None, True), RuntimeError, "Expected a value of type 'str' for argument 'likelihood'"),
    ("recon_loss", "likelihood 'poisson'", lambda: ops.recon_loss(_x(), _t(), None, "poisson", True), ValueError, "expected likelihood to be 'bernoulli', 'cbernoulli', 'squared_error' or 'gaussian'"),
    ("recon_loss", "likelihood ''", lambda: ops.recon_loss(_x(), _t(), None, "", True), ValueError, "expected likelihood to be"),
    ("recon_loss", "likelihood 'BERNOULLI'", lambda: ops.recon_loss(_x(), _t(), None, "BERNOULLI", True), ValueError, "expected likelihood to be"),
    ("recon_loss", "likelihood 'gaussian ' (trailing space)", lambda: ops.recon_loss(_x(), _t(), None, "gaussian ", True), ValueError, "expected likelihood to be"),
    ("recon_loss", "'gaussian' without log_scale", lambda: ops.recon_loss(_x(), _t(), None, "gaussian", True), ValueError, "likelihood 'gaussian' needs log_scale tensor"),
    ("recon_loss", "'bernoulli' with log_scale", lambda: ops.recon_loss(_x(), _t(), torch.zeros(3, 4), "bernoulli", True), ValueError, "likelihood 'bernoulli' takes no log_scale tensor"),
    ("recon_loss", "'squared_error' with log_scale", lambda: ops.recon_loss(_x(), _t(), torch.zeros(3, 4), "squared_error", True), ValueError, "takes no log_scale tensor"),
    ("recon_loss", "log_scale of shape [3, 1] (the op wants recon's shape)", lambda: ops.recon_loss(_x(), _t(), torch.zeros(3, 1), "gaussian", True), ValueError, "expected log_scale of shape [3, 4]"),
    ("recon_loss", "float64 log_scale, float32 recon", lambda: ops.recon_loss(_x(), _t(), torch.zeros(3, 4, dtype=torch.float64), "gaussian", True), TypeError, "expected log_scale of dtype Float (the dtype of recon), got Double"),
    ("recon_loss", "float16 log_scale, bfloat16 recon", lambda: ops.recon_loss(_x().bfloat16(), _t(), torch.zeros(3, 4, dtype=torch.float16), "gaussian", True), TypeError, "expected log_scale of dtype BFloat16 (the dtype of recon) or Float, got Half"),
    ("recon_loss", "log_scale on 'meta'", lambda: ops.recon_loss(_x(), _t(), torch.zeros(3, 4, device=META), "gaussian", True), RuntimeError, "expected log_scale on the device of recon"),
    ("recon_loss_backward", "grad of shape [2]", lambda: ops.recon_loss_backward(torch.ones(2), _x(), _t(), None, "bernoulli", True), ValueError, "expected grad of shape [3]"),
    ("recon_loss_backward", "grad of shape [3, 1]", lambda: ops.recon_loss_backward(torch.ones(3, 1), _x(), _t(), None, "bernoulli", True), ValueError, "expected grad of shape [3]"),
    ("recon_loss_backward", "0-d grad", lambda: ops.recon_loss_backward(torch.tensor(1.0), _x(), _t(), None, "bernoulli", True), ValueError, "expected grad of shape [3]"),
    ("recon_loss_backward", "grad on 'meta'", lambda: ops.recon_loss_backward(torch.ones(3, device=META), _x(), _t(), None, "bernoulli", True), RuntimeError, "expected grad on the device of recon"),
    ("recon_loss_backward", "grad of shape [2], everything on 'meta'", lambda: ops.recon_loss_backward(torch.ones(2, device=META), _x().to(META), _t().to(META), None, "bernoulli", True), RuntimeError, "expected grad of shape [3]"),
    ("recon_loss_backward", "target of another shape", lambda: ops.recon_loss_backward(torch.ones(3), _x(), _t()[:2], None, "bernoulli", True), ValueError, "expected target of shape [3, 4]"),
    ("recon_loss_backward", "likelihood 'poisson'", lambda: ops.recon_loss_backward(torch.ones(3), _x(), _t(), None, "poisson", True), ValueError, "expected likelihood to be"),
    ("gaussian_kl", "logvar of another shape", lambda: ops.gaussian_kl(_x(), _t()[:, :2]), ValueError, "expected logvar of shape [3, 4]"),
    ("gaussian_kl", "float64 logvar, float32 mu", lambda: ops.gaussian_kl(_x(), _t().double()), TypeError, "expected logvar of dtype Float"),
    ("gaussian_kl", "int32 mu and logvar", lambda: ops.gaussian_kl(_x().int(), _t().int()), TypeError, "expected mu to be float32"),
    ("gaussian_kl", "0-d mu and logvar", lambda: ops.gaussian_kl(torch.tensor(0.0), torch.tensor(0.0)), ValueError, "expected mu of shape [batch, ...]"),
    ("gaussian_kl", "mu None", lambda: ops.gaussian_kl(None, _t()), RuntimeError, "tensor does not have a device"),
    ("gaussian_kl", "logvar on 'meta'", lambda: ops.gaussian_kl(_x(), _t().to(META)), RuntimeError, "expected logvar on the device of mu"),
    ("gaussian_kl_per_dim", "logvar of another shape", lambda: ops.gaussian_kl_per_dim(_x(), _t()[:2]), ValueError, "expected logvar of shape [3, 4]"),
    ("gaussian_kl_per_dim", "bool mu and logvar", lambda: ops.gaussian_kl_per_dim(_x() > 0, _t() > 0), TypeError, "expected mu to be float32"),
    ("gaussian_kl_backward", "grad of shape [4]", lambda: ops.gaussian_kl_backward(torch.ones(4), _x(), _t()), ValueError, "expected grad of shape [3] or [3, 4]"),
    ("gaussian_kl_backward", "grad of shape [3, 5]", lambda: ops.gaussian_kl_backward(torch.ones(3, 5), _x(), _t()), ValueError, "expected grad of shape [3] or [3, 4]"),
    ("gaussian_kl_backward", "grad on 'meta'", lambda: ops.gaussian_kl_backward(torch.ones(3, device=META), _x(), _t()), RuntimeError, "expected grad on the device of mu"),
    ("gaussian_kl_backward", "grad of shape [4], everything on 'meta'", lambda: ops.gaussian_kl_backward(torch.ones(4, device=META), _x().to(META), _t().to(META)), RuntimeError, "expected grad of shape [3] or [3, 4]"),
    ("cb_log_normalizer", "int64 logits", lambda: ops.cb_log_normalizer(_x().long()), TypeError, "expected logits to be float32"),
    ("cb_log_normalizer", "None", lambda: ops.cb_log_normalizer(None), NotImplementedError, "There were no tensor arguments to this function"),
    ("cb_log_normalizer", "complex64 logits", lambda: ops.cb_log_normalizer(_x().to(torch.complex64)), TypeError, "expected logits to be float32"),
    ("cb_log_normalizer_backward", "grad of another shape", lambda: ops.cb_log_normalizer_backward(torch.ones(3), _x()), ValueError, "expected grad of shape [3, 4]"),
    ("cb_log_normalizer_backward", "grad on 'meta'", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4, device=META), _x()), RuntimeError, "expected grad on the device of logits"),
    ("cb_log_normalizer_backward", "int64 logits", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4), _x().long()), TypeError, "expected logits to be float32"),
]


# ------------------------------------------------------------- the doc ----


def _cell(text):
    return str(text).replace("|", "\\|")


def render() -> str:
    lines = [
        "# Errors",
        "",
        "What `fusedvae.vae_loss` (and `fusedvae.reference.vae_loss`, which shares its checks)",
        "raises for each kind of bad argument, and what the `torch.ops.fusedvae` ops raise",
        "when called directly. Every error names the argument and says what was expected.",
        "The 'meta' device stands in for any other device than `recon`'s.",
        "",
        "Generated by `python tests/test_errors.py` from the matrix in",
        "`tests/test_errors.py`, whose tests assert that every row is what",
        "actually happens (and that this file is current).",
        "",
        "Not errors, by design: tensor values are not range-checked unless",
        "`validate=True` (a 0-d tensor `beta` or `log_scale` is never checked: that would",
        "sync with the device); NaN inputs give NaN outputs.",
        "",
        "## `vae_loss` arguments",
        "",
        "| argument | bad value | exception | message fragment |",
        "|---|---|---|---|",
    ]
    for arg, bad, _, exc, fragment in VAE_LOSS_CASES:
        lines.append(f"| `{arg}` | {_cell(bad)} | `{exc.__name__}` | {_cell(fragment)} |")
    lines += [
        "",
        "## Direct op calls (`torch.ops.fusedvae.*`)",
        "",
        "The ops check their inputs in C++ (`TORCH_CHECK` surfaces as `RuntimeError`,",
        "`TORCH_CHECK_VALUE` as `ValueError`, `TORCH_CHECK_TYPE` as `TypeError`) and, when any",
        "argument is a meta tensor, in the fake kernels of `fusedvae/_ops.py` (`RuntimeError`);",
        "`None` for a tensor reaches the C++ checks as an undefined (empty) tensor. None of",
        "these brings the process down (a subprocess runs the whole table).",
        "",
        "| op | bad input | exception | message fragment |",
        "|---|---|---|---|",
    ]
    for op, bad, _, exc, fragment in OP_CASES:
        lines.append(f"| `{op}` | {_cell(bad)} | `{exc.__name__}` | {_cell(fragment)} |")
    return "\n".join(lines) + "\n"


def test_errors_md_is_current():
    with open(DOC) as f:
        assert f.read() == render(), "docs/errors.md is out of date: run python tests/test_errors.py"


def test_errors_md_rows_parse_back_to_the_matrix():
    # The table as a reader sees it: each row's exception and fragment.
    with open(DOC) as f:
        rows = [line for line in f if line.startswith("| `")]
    assert len(rows) == len(VAE_LOSS_CASES) + len(OP_CASES)
    for row, case in zip(rows, VAE_LOSS_CASES + OP_CASES):
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
        assert cells[0] == f"`{case[0]}`" and cells[2] == f"`{case[3].__name__}`" and cells[3] == case[4]


# ----------------------------------------------------------- the tests ----


@pytest.mark.parametrize("fn", [fusedvae.vae_loss, reference.vae_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("case", VAE_LOSS_CASES, ids=[f"{c[0]}: {c[1]}" for c in VAE_LOSS_CASES])
def test_vae_loss_bad_argument(case, fn):
    arg, _, change, exc, fragment = case
    with pytest.raises(exc) as info:
        _call(fn, **change)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert fragment in message, message
    assert arg in message, f"the message does not name {arg!r}: {message}"


def test_every_argument_has_rows():
    import inspect

    names = list(inspect.signature(fusedvae.vae_loss).parameters)
    covered = {c[0] for c in VAE_LOSS_CASES}
    assert covered == set(names), set(names) ^ covered
    kinds = {}
    for arg, _, _, exc, _ in VAE_LOSS_CASES:
        kinds.setdefault(arg, set()).add(exc)
    # every tensor argument has both a TypeError (type/dtype) and a ValueError (shape/device/range) row
    for arg in ("recon", "target", "mu", "logvar", "beta", "log_scale", "free_bits"):
        assert kinds[arg] == {TypeError, ValueError}, arg


@pytest.mark.parametrize("case", OP_CASES, ids=[f"{c[0]}: {c[1]}" for c in OP_CASES])
def test_direct_op_bad_input(case):
    _, _, call, exc, fragment = case
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, (RuntimeError, ValueError, TypeError))
    assert fragment in str(info.value), str(info.value)


def test_every_op_has_rows():
    ops_in_table = {c[0] for c in OP_CASES}
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("fusedvae::")}
    assert schemas == ops_in_table, schemas ^ ops_in_table


def test_direct_op_bad_inputs_do_not_crash_the_process():
    # Every bad call of the table (and a good call after them) in a fresh
    # interpreter: a segfault or abort would show as a negative return code.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import torch
        import test_errors as m
        raised = 0
        for op, bad, call, exc, fragment in m.OP_CASES:
            try:
                call()
            except Exception as e:
                assert isinstance(e, exc), (op, bad, type(e), e)
                raised += 1
            else:
                raise SystemExit(f"no error: {{op}} {{bad}}")
        # the ops still work afterwards
        x = torch.zeros(2, 3)
        rec = torch.ops.fusedvae.recon_loss(x, torch.full((2, 3), 0.5), None, "bernoulli", True)
        assert torch.allclose(rec, torch.full((2,), 3 * 0.6931471805599453)), rec
        print("raised", raised)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip() == f"raised {len(OP_CASES)}"

# ------------------------------------------------- more bad input, by kind ---
# The same kinds of mistake on [B, C, H, W] inputs, for the fused loss and the
# reference alike, the module, and direct op calls; and valid input that
# validate=True accepts.


def _good_image_batch():
    inp = make_inputs("bernoulli", True, torch.float32, (5,), batch=3, sample_shape=(2, 3, 4))
    return inp.recon, inp.target, inp.mu, inp.logvar


def _bad_cases():
    r, t, m, lv = _good_image_batch()
    meta = torch.device("meta")
    return [
        ("mu batch", ValueError, "mu", (r, t, m[:2], lv[:2]), {}),
        ("target shape", ValueError, "target", (r, t[:, :1], m, lv), {}),
        ("logvar shape", ValueError, "logvar", (r, t, m, lv[:, :4]), {}),
        ("likelihood", ValueError, "likelihood", (r, t, m, lv), {"likelihood": "poisson"}),
        ("reduction", ValueError, "reduction", (r, t, m, lv), {"reduction": "avg"}),
        ("int recon", TypeError, "recon", (r.long(), t, m, lv), {}),
        ("recon not tensor", TypeError, "recon", (r.tolist(), t, m, lv), {}),
        ("recon numpy", TypeError, "recon", (r.numpy(), t, m, lv), {}),
        ("int mu", TypeError, "mu", (r, t, m.int(), lv), {}),
        ("int target", TypeError, "target", (r, t.int(), m, lv), {}),
        ("negative beta", ValueError, "beta", (r, t, m, lv), {"beta": -0.1}),
        ("nan beta", ValueError, "beta", (r, t, m, lv), {"beta": float("nan")}),
        ("beta not 0-d", ValueError, "beta", (r, t, m, lv), {"beta": torch.ones(3)}),
        ("negative free_bits", ValueError, "free_bits", (r, t, m, lv), {"free_bits": -1.0}),
        ("log_scale bernoulli", ValueError, "log_scale", (r, t, m, lv), {"log_scale": 0.5}),
        ("log_scale cbernoulli", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "cbernoulli", "log_scale": torch.zeros(())}),
        ("log_scale shape", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": torch.zeros(5, 1)}),
        ("log_scale bigger", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": torch.zeros(2, 3, 2, 3, 4)}),
        ("log_scale bogus", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": "bogus"}),
        ("log_scale inf", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": float("inf")}),
        ("target requires grad", ValueError, "target", (r, t.clone().requires_grad_(), m, lv), {}),
        ("validate target", ValueError, "target", (r, t + 1.5, m, lv), {"validate": True}),
        ("validate target cb", ValueError, "target", (r, t - 1.0, m, lv), {"likelihood": "cbernoulli", "validate": True}),
        ("validate probs", ValueError, "recon", (r, t, m, lv), {"logits": False, "validate": True}),
        ("meta mu", ValueError, "mu", (r, t, m.to(meta), lv), {}),
        ("meta logvar", ValueError, "logvar", (r, t, m, lv.to(meta)), {}),
        ("meta target", ValueError, "target", (r, t.to(meta), m, lv), {}),
        ("meta log_scale", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": torch.zeros(r.shape, device=meta)}),
        ("meta beta", ValueError, "beta", (r, t, m, lv), {"beta": torch.tensor(1.0, device=meta)}),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("fn", [fusedvae.vae_loss, reference.vae_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises(case, fn):
    _, exc, name, args, kwargs = case
    with pytest.raises(exc, match=name):
        fn(*args, **kwargs)


def test_bad_input_module_raises():
    r, t, m, lv = _good_image_batch()
    with pytest.raises(ValueError, match="reduction"):
        fusedvae.VAELoss(reduction="avg")(r, t, m, lv)


def test_validate_accepts_valid_input():
    r, t, m, lv = _good_image_batch()
    exp = reference.vae_loss(r, t, m, lv)
    torch.testing.assert_close(fusedvae.vae_loss(r, t, m, lv, validate=True).loss, exp.loss, rtol=1e-5, atol=1e-5)
    p = torch.sigmoid(r)
    p[0, 0, 0, 0] = 0.0
    p[1, 0, 0, 0] = 1.0
    out = fusedvae.vae_loss(p, t, m, lv, logits=False, validate=True)
    torch.testing.assert_close(out.loss, reference.vae_loss(p, t, m, lv, logits=False).loss, rtol=1e-5, atol=1e-5)
    t8 = torch.randint(0, 256, r.shape, dtype=torch.uint8)
    fusedvae.vae_loss(r, t8, m, lv, likelihood="cbernoulli", validate=True)
    # Gaussian targets are not range-checked.
    fusedvae.vae_loss(r, t * 10 - 5, m, lv, likelihood="gaussian", validate=True)


def test_beta_zero_int_accepted():
    r, t, m, lv = _good_image_batch()
    out = fusedvae.vae_loss(r, t, m, lv, beta=0, reduction="none")
    torch.testing.assert_close(out.loss, reference.vae_loss(r, t, m, lv, reduction="none").rec, rtol=1e-6, atol=1e-6)


def _direct_bad_calls():
    x = torch.randn(3, 4)
    t = torch.rand(3, 4)
    s = torch.zeros(3, 4)
    g = torch.ones(3)
    return [
        ("int recon", lambda: ops.recon_loss(x.long(), t, None, "bernoulli", True)),
        ("int target", lambda: ops.recon_loss(x, t.int(), None, "bernoulli", True)),
        ("target dtype", lambda: ops.recon_loss(x, t.double(), None, "bernoulli", True)),
        ("target shape", lambda: ops.recon_loss(x, t[:, :3], None, "bernoulli", True)),
        ("target numel same, shape differs", lambda: ops.recon_loss(x, t.reshape(4, 3), None, "bernoulli", True)),
        ("0-d recon", lambda: ops.recon_loss(x[0, 0], t[0, 0], None, "bernoulli", True)),
        ("likelihood", lambda: ops.recon_loss(x, t, None, "poisson", True)),
        ("gaussian without log_scale", lambda: ops.recon_loss(x, t, None, "gaussian", True)),
        ("bernoulli with log_scale", lambda: ops.recon_loss(x, t, s, "bernoulli", True)),
        ("log_scale shape", lambda: ops.recon_loss(x, t, s[:, :1], "gaussian", True)),
        ("log_scale dtype", lambda: ops.recon_loss(x, t, s.double(), "gaussian", True)),
        ("bwd grad shape", lambda: ops.recon_loss_backward(torch.ones(2), x, t, None, "bernoulli", True)),
        ("bwd grad 2-d", lambda: ops.recon_loss_backward(torch.ones(3, 1), x, t, None, "bernoulli", True)),
        ("bwd target shape", lambda: ops.recon_loss_backward(g, x, t[:2], None, "bernoulli", True)),
        ("kl shape", lambda: ops.gaussian_kl(x, t[:, :2])),
        ("kl dtype", lambda: ops.gaussian_kl(x, t.double())),
        ("kl int", lambda: ops.gaussian_kl(x.int(), t.int())),
        ("kl 0-d", lambda: ops.gaussian_kl(x[0, 0], t[0, 0])),
        ("kl bwd grad shape", lambda: ops.gaussian_kl_backward(torch.ones(4), x, t)),
        ("cb int", lambda: ops.cb_log_normalizer(x.long())),
        ("cb bwd grad shape", lambda: ops.cb_log_normalizer_backward(torch.ones(3), x)),
    ]


DIRECT_BAD = _direct_bad_calls()


@pytest.mark.parametrize("call", DIRECT_BAD, ids=[c[0] for c in DIRECT_BAD])
def test_direct_op_bad_input_raises(call):
    # TORCH_CHECK_VALUE/TYPE surface as ValueError/TypeError, TORCH_CHECK as RuntimeError.
    with pytest.raises((RuntimeError, ValueError, TypeError), match="fusedvae"):
        call[1]()


@pytest.mark.parametrize(
    "op_call",
    [
        ("recon_loss target on meta", lambda x, m: ops.recon_loss(x, m, None, "bernoulli", True)),
        ("gaussian_kl logvar on meta", lambda x, m: ops.gaussian_kl(x, m)),
    ],
    ids=lambda c: c[0],
)
def test_direct_op_mixed_devices_raises(op_call):
    # recon on the CPU, one other tensor on 'meta': like every aten op
    # ("Tensor on device meta is not on the expected device cpu!") this must
    # raise, not hand back an uninitialised CPU tensor.
    x = torch.randn(3, 4)
    m = torch.rand(3, 4, device="meta")
    with pytest.raises((RuntimeError, ValueError)):
        out = op_call[1](x, m)
        pytest.fail(f"no error; returned a {out.device} tensor {out}")


if __name__ == "__main__":
    with open(DOC, "w") as f:
        f.write(render())
    print(f"wrote {DOC}")
