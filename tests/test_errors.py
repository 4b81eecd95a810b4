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


def _call_with(fn, args, change):
    """Call ``fn`` with the good positional ``args`` (a dict in order), some of
    them replaced, and keyword arguments from ``change``; a callable in
    ``change`` maps the good arguments to the bad value."""
    args = dict(args)
    kwargs = {}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v(args) if callable(v) else v
    return fn(*args.values(), **kwargs)


def _call(fn, **change):
    """Call ``fn`` (``vae_loss`` or its reference) with the good arguments, some of them replaced."""
    r, t, m, lv = _good()
    return _call_with(fn, dict(recon=r, target=t, mu=m, logvar=lv), change)


def _assert_raises_naming(arg, exc, fragment, call):
    """``call()`` raises exactly ``exc``, with ``fragment`` and the argument's name in its message."""
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert fragment in message, message
    assert arg in message, f"the message does not name {arg!r}: {message}"


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
    ("mu", "a float", dict(mu=0.5), TypeError, "mu must be a tensor or a sequence of tensors"),
    ("mu", "an empty list", dict(mu=[], logvar=[]), ValueError, "mu must hold at least one latent group"),
    ("mu", "a list of a float", dict(mu=[0.5], logvar=lambda a: [a["logvar"]]), TypeError, "mu[0] must be a torch.Tensor"),
    ("mu", "a group of another batch size", dict(mu=lambda a: [a["mu"], a["mu"][:2]], logvar=lambda a: [a["logvar"], a["logvar"][:2]]), ValueError, "mu[1] must have the batch size of recon"),
    ("mu", "int32 tensor", dict(mu=lambda a: a["mu"].int()), TypeError, "mu must be a floating-point tensor"),
    ("mu", "0-d tensor", dict(mu=torch.tensor(0.0), logvar=torch.tensor(0.0)), ValueError, "mu must have shape [batch, ...]"),
    ("mu", "another batch size", dict(mu=lambda a: a["mu"][:2], logvar=lambda a: a["logvar"][:2]), ValueError, "mu must have the batch size of recon"),
    ("mu", "on 'meta'", dict(mu=lambda a: a["mu"].to(META)), ValueError, "mu must be on the device of recon"),
    ("logvar", "a float", dict(logvar=0.5), TypeError, "logvar must be a tensor or a sequence of tensors"),
    ("logvar", "a tuple beside a tensor mu", dict(logvar=lambda a: (a["logvar"],)), ValueError, "logvar must hold one tensor per group of mu (1)"),
    ("logvar", "a list of a float", dict(mu=lambda a: [a["mu"]], logvar=[0.5]), TypeError, "logvar[0] must be a torch.Tensor"),
    ("logvar", "two groups beside one", dict(mu=lambda a: [a["mu"]], logvar=lambda a: [a["logvar"], a["logvar"]]), ValueError, "logvar must hold one tensor per group of mu (1)"),
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
    ("log_scale", "0.5 with `likelihood='bernoulli'`", dict(log_scale=0.5), ValueError, "log_scale is only used with a likelihood that has a scale ('gaussian', 'laplace')"),
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
    ("free_bits", "3 values for 2 groups", dict(mu=lambda a: [a["mu"]] * 2, logvar=lambda a: [a["logvar"]] * 2, free_bits=[0.0] * 3), ValueError, "free_bits must be a float or hold one value per group of mu (2)"),
    ("free_bits", "a negative group's value", dict(mu=lambda a: [a["mu"]] * 2, logvar=lambda a: [a["logvar"]] * 2, free_bits=[0.0, -1.0]), ValueError, "free_bits must be a finite number >= 0"),
    ("prior_mu", "a float", dict(prior_mu=0.5, prior_logvar=lambda a: a["logvar"]), TypeError, "prior_mu must be a tensor, a sequence of tensors or None"),
    ("prior_mu", "without prior_logvar", dict(prior_mu=lambda a: a["mu"]), ValueError, "prior_logvar must be given with prior_mu"),
    ("prior_mu", "int64 tensor", dict(prior_mu=lambda a: a["mu"].long(), prior_logvar=lambda a: a["logvar"]), TypeError, "prior_mu must be a floating-point tensor"),
    ("prior_mu", "shape [5, 1] (not broadcastable)", dict(prior_mu=torch.zeros(5, 1), prior_logvar=lambda a: a["logvar"]), ValueError, "prior_mu must be broadcastable to the shape of mu"),
    ("prior_mu", "on 'meta'", dict(prior_mu=lambda a: a["mu"].to(META), prior_logvar=lambda a: a["logvar"]), ValueError, "prior_mu must be on the device of recon"),
    ("prior_mu", "two groups beside one", dict(prior_mu=lambda a: [a["mu"]] * 2, prior_logvar=lambda a: a["logvar"]), ValueError, "prior_mu must hold one entry per group of mu (1)"),
    ("prior_logvar", "a float", dict(prior_mu=lambda a: a["mu"], prior_logvar=0.5), TypeError, "prior_logvar must be a tensor, a sequence of tensors or None"),
    ("prior_logvar", "without prior_mu", dict(prior_logvar=lambda a: a["logvar"]), ValueError, "prior_mu must be given with prior_logvar"),
    ("prior_logvar", "int64 tensor", dict(prior_mu=lambda a: a["mu"], prior_logvar=lambda a: a["logvar"].long()), TypeError, "prior_logvar must be a floating-point tensor"),
    ("prior_logvar", "a group's of another shape", dict(mu=lambda a: [a["mu"]], logvar=lambda a: [a["logvar"]], prior_mu=lambda a: a["mu"], prior_logvar=lambda a: [a["logvar"][0][:, :2]]), ValueError, "prior_logvar[0] must be broadcastable to the shape of mu[0]"),
    ("bits", "5 with `likelihood='bernoulli'`", dict(bits=5), ValueError, "bits is only used with likelihood='dmol'"),
    ("bits", "0 with `likelihood='dmol'`", dict(likelihood="dmol", recon=torch.zeros(3, 10, 2, 4), target=torch.zeros(3, 3, 2, 4), bits=0), ValueError, "bits must be an int in [1, 16]"),
    ("recon", "not [B, 10K, H, W] with `likelihood='dmol'`", dict(likelihood="dmol", recon=torch.zeros(3, 11, 2, 4), target=torch.zeros(3, 3, 2, 4)), ValueError, "recon must have shape [B, 10K, H, W]"),
    ("weight", "with `likelihood='dmol'`", dict(likelihood="dmol", recon=torch.zeros(3, 10, 2, 4), target=torch.zeros(3, 3, 2, 4), weight=torch.ones(1)), ValueError, "weight is not supported with likelihood='dmol'"),
    ("weight", "a list", dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor"),
    ("weight", "int64 tensor", dict(weight=torch.ones(1, dtype=torch.long)), TypeError, "weight must be a floating-point tensor"),
    ("weight", "shape [5, 1] (not broadcastable)", dict(weight=torch.ones(5, 1)), ValueError, "weight must be broadcastable to the shape of recon"),
    ("weight", "shape [2, 3, 2, 4] (broadcasts to more than recon)", dict(weight=torch.ones(2, 3, 2, 4)), ValueError, "weight must be broadcastable to the shape of recon"),
    ("weight", "requiring grad", dict(weight=torch.ones(1, requires_grad=True)), ValueError, "weight must not require grad"),
    ("weight", "on 'meta'", dict(weight=torch.ones(1, device=META)), ValueError, "weight must be on the device of recon"),
    ("validate", "1", dict(validate=1), TypeError, "validate must be a bool"),
    ("validate", "'yes'", dict(validate="yes"), TypeError, "validate must be a bool"),
]


def _good_autoencoder_kl():
    g = torch.Generator().manual_seed(0)
    inputs = torch.rand(3, 2, 4, generator=g) * 2 - 1
    reconstructions = torch.randn(3, 2, 4, generator=g)
    posterior_mean = torch.randn(3, 5, generator=g)
    posterior_logvar = torch.randn(3, 5, generator=g)
    return dict(
        inputs=inputs, reconstructions=reconstructions, posterior_mean=posterior_mean,
        posterior_logvar=posterior_logvar, logvar=0.0,
    )


def _call_autoencoder_kl(fn, **change):
    """Call ``fn`` (``autoencoder_kl_loss`` or its reference) with the good
    arguments, some of them replaced."""
    return _call_with(fn, _good_autoencoder_kl(), change)


# (argument, bad value as written in the table, changes to the good call, exception, message fragment)
AUTOENCODER_KL_CASES = [
    ("inputs", "a list", dict(inputs=lambda a: a["inputs"].tolist()), TypeError, "inputs must be a torch.Tensor"),
    ("inputs", "uint8 tensor", dict(inputs=lambda a: a["inputs"].to(torch.uint8)), TypeError, "inputs must be a floating-point tensor"),
    ("inputs", "another shape", dict(inputs=lambda a: a["inputs"][:, :1]), ValueError, "inputs must have the shape of reconstructions"),
    ("inputs", "on 'meta'", dict(inputs=lambda a: a["inputs"].to(META)), ValueError, "inputs must be on the device of reconstructions"),
    ("inputs", "requires grad", dict(inputs=lambda a: a["inputs"].clone().requires_grad_()), ValueError, "inputs must not require grad"),
    ("reconstructions", "a numpy array", dict(reconstructions=lambda a: a["reconstructions"].numpy()), TypeError, "reconstructions must be a torch.Tensor"),
    ("reconstructions", "int64 tensor", dict(reconstructions=lambda a: a["reconstructions"].long()), TypeError, "reconstructions must be a floating-point tensor"),
    ("reconstructions", "0-d tensor", dict(reconstructions=torch.tensor(0.5)), ValueError, "reconstructions must have shape [batch, ...]"),
    ("posterior_mean", "None", dict(posterior_mean=None), TypeError, "posterior_mean must be a torch.Tensor"),
    ("posterior_mean", "int32 tensor", dict(posterior_mean=lambda a: a["posterior_mean"].int()), TypeError, "posterior_mean must be a floating-point tensor"),
    ("posterior_mean", "another batch size", dict(posterior_mean=lambda a: a["posterior_mean"][:2]), ValueError, "posterior_mean must have the batch size of reconstructions"),
    ("posterior_mean", "on 'meta'", dict(posterior_mean=lambda a: a["posterior_mean"].to(META)), ValueError, "posterior_mean must be on the device of reconstructions"),
    ("posterior_logvar", "int32 tensor", dict(posterior_logvar=lambda a: a["posterior_logvar"].int()), TypeError, "posterior_logvar must be a floating-point tensor"),
    ("posterior_logvar", "another shape", dict(posterior_logvar=lambda a: a["posterior_logvar"][:, :2]), ValueError, "posterior_logvar must have the shape of posterior_mean"),
    ("logvar", "a string", dict(logvar="0"), TypeError, "logvar must be a float or a 0-d tensor"),
    ("logvar", "a tensor of shape [1]", dict(logvar=torch.zeros(1)), ValueError, "logvar must be a float or a 0-d tensor"),
    ("logvar", "int64 0-d tensor", dict(logvar=torch.tensor(0)), TypeError, "logvar must be a floating-point tensor"),
    ("logvar", "inf", dict(logvar=float("inf")), ValueError, "logvar must be finite"),
    ("kl_weight", "None", dict(kl_weight=None), TypeError, "kl_weight must be a float or a 0-d tensor"),
    ("kl_weight", "-1e-6", dict(kl_weight=-1e-6), ValueError, "kl_weight must be a finite number >= 0"),
    ("kl_weight", "a tensor of shape [3]", dict(kl_weight=torch.ones(3)), ValueError, "kl_weight must be a float or a 0-d tensor"),
    ("perceptual", "a float", dict(perceptual=0.5), TypeError, "perceptual must be a torch.Tensor"),
    ("perceptual", "int64 tensor", dict(perceptual=torch.ones(3, dtype=torch.long)), TypeError, "perceptual must be a floating-point tensor"),
    ("perceptual", "shape [3, 2] (not one value per sample)", dict(perceptual=torch.ones(3, 2)), ValueError, "perceptual must hold one value per sample"),
    ("perceptual", "on 'meta'", dict(perceptual=torch.ones(3, device=META)), ValueError, "perceptual must be on the device of reconstructions"),
    ("weights", "a list", dict(weights=[1.0]), TypeError, "weights must be a torch.Tensor"),
    ("weights", "shape [5, 1] (not broadcastable)", dict(weights=torch.ones(5, 1)), ValueError, "weights must be broadcastable to the shape of reconstructions"),
    ("weights", "requiring grad", dict(weights=torch.ones(1, requires_grad=True)), ValueError, "weights must not require grad"),
]


def _dp():
    return torch.randn(2, 30, 3, 4, generator=torch.Generator().manual_seed(0))


def _dt():
    return torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _x():
    return torch.randn(3, 4)


def _t():
    return torch.rand(3, 4)


def _loss_args(tensors=None):
    """The good arguments of ``ops.vae_loss`` by schema name: recon and target
    [3, 2, 4], mu and logvar [3, 5], a Bernoulli likelihood on logits, the batch mean."""
    r, t, m, lv = _good() if tensors is None else tensors
    return dict(recon=r, target=t, mu=m, logvar=lv, log_scale=None, beta=None, likelihood="bernoulli",
                logits=True, reduction="batchmean", log_scale_value=0.0, optimal_scale=False,
                beta_value=1.0, free_bits=0.0, weight=None)


def _changed(args, change):
    # A callable gets the good arguments and returns the bad value.
    good = dict(args)
    for k, v in change.items():
        assert k in args, k
        args[k] = v(good) if callable(v) else v
    return args


def _loss(_tensors=None, **change):
    """``ops.vae_loss`` with the good arguments, some of them replaced."""
    return ops.vae_loss(**_changed(_loss_args(_tensors), change))


def _loss_backward(_tensors=None, **change):
    """``ops.vae_loss_backward`` likewise: grad_loss 1 (0-d, the loss is reduced), no
    grad_rec or grad_kl, the aux of the good forward, every gradient wanted."""
    args = _loss_args(_tensors)
    aux = ops.vae_loss(**args)[3]
    args = dict(grad_loss=torch.tensor(1.0), grad_rec=None, grad_kl=None, **args, aux=aux,
                output_mask=[True, True, True, True], recon_coefficients=False)
    return ops.vae_loss_backward(**_changed(args, change))


def _loss_and_grad(_tensors=None, **change):
    """``ops.vae_loss_and_grad`` with the good arguments, some of them replaced."""
    return ops.vae_loss_and_grad(**_changed(_loss_args(_tensors), change))


def _meta(*names, **change):
    """Changes that move the named tensors to 'meta', then ``change``."""
    return {**{n: (lambda a, n=n: a[n].to(META)) for n in names}, **change}


_ALL_META = ("recon", "target", "mu", "logvar")
_LIKELIHOODS = "expected likelihood to be one of 'bernoulli', 'cbernoulli', 'gaussian', 'laplace', got "
_REDUCTIONS = "expected reduction to be 'batchmean', 'sum', 'mean' or 'none', got "
_FLOATING = "to be float32, float64, float16 or bfloat16, got "
_AUX = "expected aux to be the fourth output of vae_loss for these arguments: contiguous, of shape "

# Messages that torch itself gives, before any fusedvae check runs: a None
# tensor argument the op reads the device of, an argument of the wrong type for
# the schema, a bool[4] of another length.
TORCH_MESSAGES = (
    "tensor does not have a device",
    "Expected a value of type",
    "Tried to convert a List with",
)

# (op, bad input as written in the table, call, exception, message fragment)
OP_CASES = [
    # vae_loss: recon
    ("vae_loss", "int64 recon", lambda: _loss(recon=lambda a: a["recon"].long()), TypeError, "expected recon " + _FLOATING + "Long"),
    ("vae_loss", "bool recon", lambda: _loss(recon=lambda a: a["recon"] > 0), TypeError, "expected recon " + _FLOATING + "Bool"),
    ("vae_loss", "complex64 recon", lambda: _loss(recon=lambda a: a["recon"].to(torch.complex64)), TypeError, "expected recon " + _FLOATING + "ComplexFloat"),
    ("vae_loss", "0-d recon and target", lambda: _loss(recon=torch.tensor(0.5), target=torch.tensor(0.5)), ValueError, "expected recon of shape [batch, ...], got a 0-d tensor"),
    ("vae_loss", "recon None", lambda: _loss(recon=None), RuntimeError, "tensor does not have a device"),
    ("vae_loss", "recon on 'meta' (the rest on the CPU)", lambda: _loss(**_meta("recon")), RuntimeError, "expected target on the device of recon (meta), got cpu"),
    # vae_loss: target
    ("vae_loss", "int32 target", lambda: _loss(target=lambda a: a["target"].int()), TypeError, "expected target to be a floating-point, uint8 or bool tensor, got Int"),
    ("vae_loss", "complex64 target", lambda: _loss(target=lambda a: a["target"].to(torch.complex64)), TypeError, "expected target to be a floating-point, uint8 or bool tensor, got ComplexFloat"),
    ("vae_loss", "float64 target, float32 recon", lambda: _loss(target=lambda a: a["target"].double()), TypeError, "expected target of dtype Float, Half, BFloat16, Byte or Bool beside a recon of dtype Float, got Double"),
    ("vae_loss", "float32 target, float64 recon", lambda: _loss(recon=lambda a: a["recon"].double()), TypeError, "expected target of dtype Double, Byte or Bool beside a recon of dtype Double, got Float"),
    ("vae_loss", "float16 target, float64 recon", lambda: _loss(recon=lambda a: a["recon"].double(), target=lambda a: a["target"].half()), TypeError, "expected target of dtype Double, Byte or Bool beside a recon of dtype Double, got Half"),
    ("vae_loss", "target of another shape", lambda: _loss(target=lambda a: a["target"][:, :1]), ValueError, "expected target of shape [3, 2, 4] (the shape of recon), got [3, 1, 4]"),
    ("vae_loss", "target with the same elements in another shape", lambda: _loss(target=lambda a: a["target"].reshape(3, 4, 2)), ValueError, "expected target of shape [3, 2, 4] (the shape of recon), got [3, 4, 2]"),
    ("vae_loss", "target None", lambda: _loss(target=None), ValueError, "expected target of shape [3, 2, 4] (the shape of recon), got [0]"),
    ("vae_loss", "target on 'meta'", lambda: _loss(**_meta("target")), RuntimeError, "expected target on the device of recon (cpu), got meta"),
    ("vae_loss", "target of another shape, everything on 'meta'", lambda: _loss(**_meta(*_ALL_META, target=lambda a: a["target"][:, :1].to(META))), RuntimeError, "expected target of shape (3, 2, 4) (the shape of recon), got (3, 1, 4)"),
    # vae_loss: mu
    ("vae_loss", "mu and logvar with another batch size", lambda: _loss(mu=lambda a: a["mu"][:2], logvar=lambda a: a["logvar"][:2]), ValueError, "expected mu of shape [3, ...] (the batch size of recon), got [2, 5]"),
    ("vae_loss", "0-d mu and logvar", lambda: _loss(mu=torch.tensor(0.0), logvar=torch.tensor(0.0)), ValueError, "expected mu of shape [3, ...] (the batch size of recon), got []"),
    ("vae_loss", "int32 mu", lambda: _loss(mu=lambda a: a["mu"].int()), TypeError, "expected mu " + _FLOATING + "Int"),
    ("vae_loss", "bool mu and logvar", lambda: _loss(mu=lambda a: a["mu"] > 0, logvar=lambda a: a["logvar"] > 0), TypeError, "expected mu " + _FLOATING + "Bool"),
    ("vae_loss", "mu None", lambda: _loss(mu=None), TypeError, "expected mu " + _FLOATING + "UNKNOWN_SCALAR"),
    ("vae_loss", "float64 mu and logvar, float32 recon", lambda: _loss(mu=lambda a: a["mu"].double(), logvar=lambda a: a["logvar"].double()), TypeError, "expected mu of dtype Float, Half or BFloat16 beside a recon of dtype Float, got Double"),
    ("vae_loss", "float32 mu and logvar, float64 recon and target", lambda: _loss(recon=lambda a: a["recon"].double(), target=lambda a: a["target"].double()), TypeError, "expected mu of dtype Double beside a recon of dtype Double, got Float"),
    ("vae_loss", "mu and logvar on 'meta'", lambda: _loss(**_meta("mu", "logvar")), RuntimeError, "expected mu on the device of recon (cpu), got meta"),
    ("vae_loss", "mu on 'meta'", lambda: _loss(**_meta("mu")), RuntimeError, "expected logvar on the device of mu (meta), got cpu"),
    ("vae_loss", "mu with another batch size, everything on 'meta'", lambda: _loss(**_meta(*_ALL_META, mu=lambda a: a["mu"][:2].to(META), logvar=lambda a: a["logvar"][:2].to(META))), RuntimeError, "expected mu of shape [3, ...] (the batch size of recon), got [2, 5]"),
    # vae_loss: logvar
    ("vae_loss", "logvar of another shape", lambda: _loss(logvar=lambda a: a["logvar"][:, :4]), ValueError, "expected logvar of shape [3, 5] (the shape of mu), got [3, 4]"),
    ("vae_loss", "float64 logvar, float32 mu", lambda: _loss(logvar=lambda a: a["logvar"].double()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Double"),
    ("vae_loss", "float16 logvar, float32 mu", lambda: _loss(logvar=lambda a: a["logvar"].half()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Half"),
    ("vae_loss", "int32 logvar", lambda: _loss(logvar=lambda a: a["logvar"].int()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Int"),
    ("vae_loss", "logvar None", lambda: _loss(logvar=None), ValueError, "expected logvar of shape [3, 5] (the shape of mu), got [0]"),
    ("vae_loss", "logvar on 'meta'", lambda: _loss(**_meta("logvar")), RuntimeError, "expected logvar on the device of mu (cpu), got meta"),
    # vae_loss: likelihood, reduction
    ("vae_loss", "likelihood 'poisson'", lambda: _loss(likelihood="poisson"), ValueError, _LIKELIHOODS + "'poisson'"),
    ("vae_loss", "likelihood ''", lambda: _loss(likelihood=""), ValueError, _LIKELIHOODS + "''"),
    ("vae_loss", "likelihood 'BERNOULLI'", lambda: _loss(likelihood="BERNOULLI"), ValueError, _LIKELIHOODS + "'BERNOULLI'"),
    ("vae_loss", "likelihood 'gaussian ' (trailing space)", lambda: _loss(likelihood="gaussian "), ValueError, _LIKELIHOODS + "'gaussian '"),
    ("vae_loss", "likelihood 'squared_error' (a Gaussian with a fixed scale is 'gaussian')", lambda: _loss(likelihood="squared_error"), ValueError, _LIKELIHOODS + "'squared_error'"),
    ("vae_loss", "likelihood None", lambda: _loss(likelihood=None), RuntimeError, "Expected a value of type 'str' for argument 'likelihood'"),
    ("vae_loss", "reduction 'avg'", lambda: _loss(reduction="avg"), ValueError, _REDUCTIONS + "'avg'"),
    ("vae_loss", "reduction ''", lambda: _loss(reduction=""), ValueError, _REDUCTIONS + "''"),
    ("vae_loss", "reduction 'Sum'", lambda: _loss(reduction="Sum"), ValueError, _REDUCTIONS + "'Sum'"),
    ("vae_loss", "reduction 'elementwise_mean'", lambda: _loss(reduction="elementwise_mean"), ValueError, _REDUCTIONS + "'elementwise_mean'"),
    ("vae_loss", "reduction None", lambda: _loss(reduction=None), RuntimeError, "Expected a value of type 'str' for argument 'reduction'"),
    # vae_loss: log_scale
    ("vae_loss", "0-d log_scale, likelihood 'bernoulli'", lambda: _loss(log_scale=torch.tensor(0.0)), ValueError, "likelihood 'bernoulli' takes no log_scale"),
    ("vae_loss", "log_scale of recon's shape, likelihood 'cbernoulli'", lambda: _loss(likelihood="cbernoulli", log_scale=torch.zeros(3, 2, 4)), ValueError, "likelihood 'cbernoulli' takes no log_scale"),
    ("vae_loss", "optimal_scale=True, likelihood 'bernoulli'", lambda: _loss(optimal_scale=True), ValueError, "likelihood 'bernoulli' takes no log_scale"),
    ("vae_loss", "log_scale of shape [5, 1] (not broadcastable)", lambda: _loss(likelihood="gaussian", log_scale=torch.zeros(5, 1)), ValueError, "expected log_scale of 0 dimensions or broadcastable to [3, 2, 4] (the shape of recon), got [5, 1]"),
    ("vae_loss", "log_scale of shape [2, 3, 2, 4] (broadcasts to more than recon)", lambda: _loss(likelihood="gaussian", log_scale=torch.zeros(2, 3, 2, 4)), ValueError, "expected log_scale of 0 dimensions or broadcastable to [3, 2, 4] (the shape of recon), got [2, 3, 2, 4]"),
    ("vae_loss", "log_scale of shape [1, 3, 2, 4] (more dimensions than recon)", lambda: _loss(likelihood="gaussian", log_scale=torch.zeros(1, 3, 2, 4)), ValueError, "expected log_scale of 0 dimensions or broadcastable to [3, 2, 4] (the shape of recon), got [1, 3, 2, 4]"),
    ("vae_loss", "int64 log_scale of shape [2, 1]", lambda: _loss(likelihood="gaussian", log_scale=torch.zeros(2, 1, dtype=torch.long)), TypeError, "expected log_scale of dtype Float (the dtype of recon), got Long"),
    ("vae_loss", "bool log_scale of recon's shape", lambda: _loss(likelihood="gaussian", log_scale=torch.zeros(3, 2, 4, dtype=torch.bool)), TypeError, "expected log_scale of dtype Float (the dtype of recon), got Bool"),
    ("vae_loss", "float64 log_scale, float32 recon", lambda: _loss(likelihood="gaussian", log_scale=torch.zeros(3, 2, 4, dtype=torch.float64)), TypeError, "expected log_scale of dtype Float (the dtype of recon), got Double"),
    ("vae_loss", "float16 log_scale, bfloat16 recon", lambda: _loss(recon=lambda a: a["recon"].bfloat16(), likelihood="gaussian", log_scale=torch.zeros(3, 2, 4, dtype=torch.float16)), TypeError, "expected log_scale of dtype BFloat16 (the dtype of recon) or Float, got Half"),
    ("vae_loss", "int64 0-d log_scale", lambda: _loss(likelihood="gaussian", log_scale=torch.tensor(0)), TypeError, "expected log_scale to be a floating-point tensor, got Long"),
    ("vae_loss", "complex64 0-d log_scale", lambda: _loss(likelihood="gaussian", log_scale=torch.tensor(0j, dtype=torch.complex64)), TypeError, "expected log_scale to be a floating-point tensor, got ComplexFloat"),
    # vae_loss: beta, free_bits
    ("vae_loss", "int64 0-d beta", lambda: _loss(beta=torch.tensor(1)), TypeError, "expected beta to be a floating-point tensor, got Long"),
    ("vae_loss", "bool 0-d beta", lambda: _loss(beta=torch.tensor(True)), TypeError, "expected beta to be a floating-point tensor, got Bool"),
    ("vae_loss", "beta of shape [3]", lambda: _loss(beta=torch.ones(3)), ValueError, "expected beta to be a 0-d tensor, got shape [3]"),
    ("vae_loss", "beta of shape [1]", lambda: _loss(beta=torch.ones(1)), ValueError, "expected beta to be a 0-d tensor, got shape [1]"),
    ("vae_loss", "free_bits -1.0", lambda: _loss(free_bits=-1.0), ValueError, "expected free_bits to be a finite number >= 0, got -1"),
    ("vae_loss", "free_bits nan", lambda: _loss(free_bits=float("nan")), ValueError, "expected free_bits to be a finite number >= 0, got nan"),
    ("vae_loss", "free_bits inf", lambda: _loss(free_bits=float("inf")), ValueError, "expected free_bits to be a finite number >= 0, got inf"),
    ("vae_loss", "int64 weight", lambda: _loss(weight=torch.ones(1, dtype=torch.long)), TypeError, "expected weight to be a floating-point tensor, got Long"),
    ("vae_loss", "weight of shape [5, 1]", lambda: _loss(weight=torch.ones(5, 1)), ValueError, "expected weight broadcastable to [3, 2, 4] (the shape of recon), got [5, 1]"),
    ("vae_loss", "beta_value -1.0", lambda: _loss(beta_value=-1.0), ValueError, "expected beta_value to be a finite number >= 0, got -1"),
    ("vae_loss", "log_scale_value inf", lambda: _loss(likelihood="gaussian", log_scale_value=float("inf")), ValueError, "expected log_scale_value to be finite, got inf"),
    ("vae_loss", "0-d log_scale and optimal_scale", lambda: _loss(likelihood="gaussian", log_scale=torch.tensor(0.0), optimal_scale=True), ValueError, "expected no log_scale tensor with optimal_scale=True"),
    # vae_loss_backward: aux
    ("vae_loss_backward", "aux of shape [12] (one short)", lambda: _loss_backward(aux=lambda a: a["aux"][:12]), ValueError, _AUX + "[13] and dtype Float, got shape [12] and dtype Float"),
    ("vae_loss_backward", "aux of shape [1, 13]", lambda: _loss_backward(aux=lambda a: a["aux"][None]), ValueError, _AUX + "[13] and dtype Float, got shape [1, 13] and dtype Float"),
    ("vae_loss_backward", "0-d aux", lambda: _loss_backward(aux=torch.tensor(0.0)), ValueError, _AUX + "[13] and dtype Float, got shape [] and dtype Float"),
    ("vae_loss_backward", "float64 aux, float32 recon", lambda: _loss_backward(aux=lambda a: a["aux"].double()), ValueError, _AUX + "[13] and dtype Float, got shape [13] and dtype Double"),
    ("vae_loss_backward", "int64 aux", lambda: _loss_backward(aux=lambda a: a["aux"].long()), ValueError, _AUX + "[13] and dtype Float, got shape [13] and dtype Long"),
    ("vae_loss_backward", "non-contiguous aux", lambda: _loss_backward(aux=torch.zeros(26)[::2]), ValueError, _AUX + "[13] and dtype Float, got shape [13] and dtype Float"),
    ("vae_loss_backward", "the float32 aux, float64 inputs", lambda: _loss_backward(recon=lambda a: a["recon"].double(), target=lambda a: a["target"].double(), mu=lambda a: a["mu"].double(), logvar=lambda a: a["logvar"].double()), ValueError, _AUX + "[13] and dtype Double, got shape [13] and dtype Float"),
    ("vae_loss_backward", "aux of mu [3, 5], mu and logvar [3, 4]", lambda: _loss_backward(mu=lambda a: a["mu"][:, :4], logvar=lambda a: a["logvar"][:, :4]), ValueError, _AUX + "[12] and dtype Float, got shape [13] and dtype Float"),
    ("vae_loss_backward", "aux None", lambda: _loss_backward(aux=None), RuntimeError, "tensor does not have a device"),
    # vae_loss_backward: the upstream gradients
    ("vae_loss_backward", "grad_loss of shape [3], reduction 'batchmean'", lambda: _loss_backward(grad_loss=torch.ones(3)), ValueError, "expected grad_loss of shape [] (the loss is reduced), got [3]"),
    ("vae_loss_backward", "grad_loss of shape [1], reduction 'sum'", lambda: _loss_backward(grad_loss=torch.ones(1), reduction="sum"), ValueError, "expected grad_loss of shape [] (the loss is reduced), got [1]"),
    ("vae_loss_backward", "0-d grad_loss, reduction 'none'", lambda: _loss_backward(reduction="none"), ValueError, "expected grad_loss of shape [3], got []"),
    ("vae_loss_backward", "grad_loss of shape [2], reduction 'none'", lambda: _loss_backward(grad_loss=torch.ones(2), reduction="none"), ValueError, "expected grad_loss of shape [3], got [2]"),
    ("vae_loss_backward", "grad_loss of shape [3, 1], reduction 'none'", lambda: _loss_backward(grad_loss=torch.ones(3, 1), reduction="none"), ValueError, "expected grad_loss of shape [3], got [3, 1]"),
    ("vae_loss_backward", "grad_rec of shape [2]", lambda: _loss_backward(grad_loss=None, grad_rec=torch.ones(2)), ValueError, "expected grad_rec of shape [3], got [2]"),
    ("vae_loss_backward", "0-d grad_rec", lambda: _loss_backward(grad_loss=None, grad_rec=torch.tensor(1.0)), ValueError, "expected grad_rec of shape [3], got []"),
    ("vae_loss_backward", "grad_rec of shape [3, 1]", lambda: _loss_backward(grad_rec=torch.ones(3, 1)), ValueError, "expected grad_rec of shape [3], got [3, 1]"),
    ("vae_loss_backward", "grad_kl of shape [4]", lambda: _loss_backward(grad_loss=None, grad_kl=torch.ones(4)), ValueError, "expected grad_kl of shape [3], got [4]"),
    ("vae_loss_backward", "0-d grad_kl", lambda: _loss_backward(grad_kl=torch.tensor(1.0)), ValueError, "expected grad_kl of shape [3], got []"),
    ("vae_loss_backward", "grad_rec of shape [2], everything on 'meta'", lambda: _loss_backward(**_meta(*_ALL_META, "aux", grad_loss=None, grad_rec=torch.ones(2, device=META))), RuntimeError, "expected grad_rec of shape [3], got [2]"),
    ("vae_loss_backward", "grad_kl of shape [4], everything on 'meta'", lambda: _loss_backward(**_meta(*_ALL_META, "aux", grad_loss=None, grad_kl=torch.ones(4, device=META))), RuntimeError, "expected grad_kl of shape [3], got [4]"),
    ("vae_loss_backward", "output_mask of 3 entries", lambda: _loss_backward(output_mask=[True, True, True]), RuntimeError, "Tried to convert a List with 3 elements to a fixed-size array of size 4"),
    ("vae_loss_backward", "recon_coefficients=True, one log-scale for the whole batch (optimal_scale=True)", lambda: _loss_backward(likelihood="gaussian", optimal_scale=True, recon_coefficients=True), ValueError, "expected recon_coefficients=False with one log-scale for the whole batch (a number, a 0-d log_scale or optimal_scale=True), whose recon gradient is no per-sample multiple of vae_loss_and_grad's"),
    ("vae_loss_backward", "recon_coefficients=True, a per-element log_scale's gradient asked for", lambda: _loss_backward(likelihood="gaussian", log_scale=torch.zeros(3, 2, 4), recon_coefficients=True), ValueError, "expected output_mask[2] to be False with recon_coefficients=True and a per-element log_scale, whose gradient comes from recon's gradient"),
    # vae_loss_and_grad: vae_loss's checks
    ("vae_loss_and_grad", "int64 recon", lambda: _loss_and_grad(recon=lambda a: a["recon"].long()), TypeError, "expected recon " + _FLOATING + "Long"),
    ("vae_loss_and_grad", "mu and logvar with another batch size", lambda: _loss_and_grad(mu=lambda a: a["mu"][:2], logvar=lambda a: a["logvar"][:2]), ValueError, "expected mu of shape [3, ...] (the batch size of recon), got [2, 5]"),
    # vae_loss_backward: the checks it shares with vae_loss
    ("vae_loss_backward", "int64 recon", lambda: _loss_backward(recon=lambda a: a["recon"].long()), TypeError, "expected recon " + _FLOATING + "Long"),
    ("vae_loss_backward", "0-d recon and target", lambda: _loss_backward(recon=torch.tensor(0.5), target=torch.tensor(0.5)), ValueError, "expected recon of shape [batch, ...], got a 0-d tensor"),
    ("vae_loss_backward", "target of another shape", lambda: _loss_backward(target=lambda a: a["target"][:2]), ValueError, "expected target of shape [3, 2, 4] (the shape of recon), got [2, 2, 4]"),
    ("vae_loss_backward", "float64 target, float32 recon", lambda: _loss_backward(target=lambda a: a["target"].double()), TypeError, "expected target of dtype Float, Half, BFloat16, Byte or Bool beside a recon of dtype Float, got Double"),
    ("vae_loss_backward", "target on 'meta'", lambda: _loss_backward(**_meta("target")), RuntimeError, "expected target on the device of recon (cpu), got meta"),
    ("vae_loss_backward", "mu and logvar with another batch size", lambda: _loss_backward(mu=lambda a: a["mu"][:2], logvar=lambda a: a["logvar"][:2]), ValueError, "expected mu of shape [3, ...] (the batch size of recon), got [2, 5]"),
    ("vae_loss_backward", "float64 mu and logvar, float32 recon", lambda: _loss_backward(mu=lambda a: a["mu"].double(), logvar=lambda a: a["logvar"].double()), TypeError, "expected mu of dtype Float, Half or BFloat16 beside a recon of dtype Float, got Double"),
    ("vae_loss_backward", "logvar of another shape", lambda: _loss_backward(logvar=lambda a: a["logvar"][:, :4]), ValueError, "expected logvar of shape [3, 5] (the shape of mu), got [3, 4]"),
    ("vae_loss_backward", "float64 logvar, float32 mu", lambda: _loss_backward(logvar=lambda a: a["logvar"].double()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Double"),
    ("vae_loss_backward", "logvar on 'meta'", lambda: _loss_backward(**_meta("logvar")), RuntimeError, "expected logvar on the device of mu (cpu), got meta"),
    ("vae_loss_backward", "likelihood 'poisson'", lambda: _loss_backward(likelihood="poisson"), ValueError, _LIKELIHOODS + "'poisson'"),
    ("vae_loss_backward", "reduction 'avg'", lambda: _loss_backward(reduction="avg"), ValueError, _REDUCTIONS + "'avg'"),
    ("vae_loss_backward", "0-d log_scale, likelihood 'bernoulli'", lambda: _loss_backward(log_scale=torch.tensor(0.0)), ValueError, "likelihood 'bernoulli' takes no log_scale"),
    ("vae_loss_backward", "log_scale of shape [5, 1] (not broadcastable)", lambda: _loss_backward(likelihood="gaussian", log_scale=torch.zeros(5, 1)), ValueError, "expected log_scale of 0 dimensions or broadcastable to [3, 2, 4] (the shape of recon), got [5, 1]"),
    ("vae_loss_backward", "float64 log_scale, float32 recon", lambda: _loss_backward(likelihood="gaussian", log_scale=torch.zeros(3, 2, 4, dtype=torch.float64)), TypeError, "expected log_scale of dtype Float (the dtype of recon), got Double"),
    ("vae_loss_backward", "int64 0-d log_scale", lambda: _loss_backward(likelihood="gaussian", log_scale=torch.tensor(0)), TypeError, "expected log_scale to be a floating-point tensor, got Long"),
    ("vae_loss_backward", "int64 0-d beta", lambda: _loss_backward(beta=torch.tensor(1)), TypeError, "expected beta to be a floating-point tensor, got Long"),
    ("vae_loss_backward", "beta of shape [3]", lambda: _loss_backward(beta=torch.ones(3)), ValueError, "expected beta to be a 0-d tensor, got shape [3]"),
    ("vae_loss_backward", "free_bits -1.0", lambda: _loss_backward(free_bits=-1.0), ValueError, "expected free_bits to be a finite number >= 0, got -1"),
    # gaussian_kl
    ("gaussian_kl", "logvar with no group", lambda: ops.gaussian_kl([_x()], [], [], [], [0.0]), ValueError, "expected logvar to hold 1 groups (as mu does), got 0"),
    ("gaussian_kl", "one prior group for two", lambda: ops.gaussian_kl([_x(), _x()], [_t(), _t()], [_x()], [_t()], [0.0, 0.0]), ValueError, "expected prior_mu and prior_logvar to be empty or to hold 2 groups (as mu does), got 1 and 1"),
    ("gaussian_kl", "two free_bits for one group", lambda: ops.gaussian_kl([_x()], [_t()], [], [], [0.0, 0.0]), ValueError, "expected free_bits to hold 1 values (one per group), got 2"),
    ("gaussian_kl", "free_bits[0] -1.0", lambda: ops.gaussian_kl([_x()], [_t()], [], [], [-1.0]), ValueError, "expected free_bits[0] to be a finite number >= 0, got -1"),
    ("gaussian_kl", "logvar[0] of another shape", lambda: ops.gaussian_kl([_x()], [_t()[:, :2]], [], [], [0.0]), ValueError, "expected logvar[0] of shape [3, 4] (the shape of mu[0]), got [3, 2]"),
    ("gaussian_kl", "mu[1] of another batch size", lambda: ops.gaussian_kl([_x(), _x()[:2]], [_t(), _t()[:2]], [], [], [0.0, 0.0]), ValueError, "expected mu[1] of shape [3, ...] (the batch size of mu[0]), got [2, 4]"),
    ("gaussian_kl", "prior_mu[0] of another shape", lambda: ops.gaussian_kl([_x()], [_t()], [_x()[:, :2]], [_t()], [0.0]), ValueError, "expected prior_mu[0] of shape [3, 4] (the shape of mu[0]), got [3, 2]"),
    ("gaussian_kl", "int32 mu[0]", lambda: ops.gaussian_kl([_x().int()], [_t()], [], [], [0.0]), TypeError, "expected mu[0] " + _FLOATING + "Int"),
    ("gaussian_kl", "int32 prior_logvar[0]", lambda: ops.gaussian_kl([_x()], [_t()], [_x()], [_t().int()], [0.0]), TypeError, "expected prior_logvar[0] " + _FLOATING + "Int"),
    # gaussian_kl_backward
    ("gaussian_kl_backward", "grad_kl of shape [2]", lambda: ops.gaussian_kl_backward(torch.ones(2), None, [_x()], [_t()], [], [], torch.empty(0), [0.0]), ValueError, "expected grad_kl of shape [3], got [2]"),
    ("gaussian_kl_backward", "dim_mean of shape [5] without free bits", lambda: ops.gaussian_kl_backward(torch.ones(3), None, [_x()], [_t()], [], [], torch.empty(5), [0.0]), ValueError, "expected dim_mean of shape [0] (gaussian_kl's third output), got [5]"),
    ("gaussian_kl_backward", "int32 logvar[0]", lambda: ops.gaussian_kl_backward(torch.ones(3), None, [_x()], [_t().int()], [], [], torch.empty(0), [0.0]), TypeError, "expected logvar[0] " + _FLOATING + "Int"),
    # gaussian_kl_per_dim
    ("gaussian_kl_per_dim", "logvar of another shape", lambda: ops.gaussian_kl_per_dim(_x(), _t()[:, :2]), ValueError, "expected logvar of shape [3, 4] (the shape of mu), got [3, 2]"),
    ("gaussian_kl_per_dim", "logvar with the same elements in another shape", lambda: ops.gaussian_kl_per_dim(_x(), _t().reshape(4, 3)), ValueError, "expected logvar of shape [3, 4] (the shape of mu), got [4, 3]"),
    ("gaussian_kl_per_dim", "float64 logvar, float32 mu", lambda: ops.gaussian_kl_per_dim(_x(), _t().double()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Double"),
    ("gaussian_kl_per_dim", "float32 logvar, float64 mu", lambda: ops.gaussian_kl_per_dim(_x().double(), _t()), TypeError, "expected logvar of dtype Double (the dtype of mu), got Float"),
    ("gaussian_kl_per_dim", "int32 logvar", lambda: ops.gaussian_kl_per_dim(_x(), _t().int()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Int"),
    ("gaussian_kl_per_dim", "int32 mu and logvar", lambda: ops.gaussian_kl_per_dim(_x().int(), _t().int()), TypeError, "expected mu " + _FLOATING + "Int"),
    ("gaussian_kl_per_dim", "bool mu and logvar", lambda: ops.gaussian_kl_per_dim(_x() > 0, _t() > 0), TypeError, "expected mu " + _FLOATING + "Bool"),
    ("gaussian_kl_per_dim", "complex64 mu and logvar", lambda: ops.gaussian_kl_per_dim(_x().to(torch.complex64), _t().to(torch.complex64)), TypeError, "expected mu " + _FLOATING + "ComplexFloat"),
    ("gaussian_kl_per_dim", "0-d mu and logvar", lambda: ops.gaussian_kl_per_dim(torch.tensor(0.0), torch.tensor(0.0)), ValueError, "expected mu of shape [batch, ...], got a 0-d tensor"),
    ("gaussian_kl_per_dim", "mu None", lambda: ops.gaussian_kl_per_dim(None, _t()), RuntimeError, "tensor does not have a device"),
    ("gaussian_kl_per_dim", "logvar None", lambda: ops.gaussian_kl_per_dim(_x(), None), RuntimeError, "tensor does not have a device"),
    ("gaussian_kl_per_dim", "logvar on 'meta'", lambda: ops.gaussian_kl_per_dim(_x(), _t().to(META)), RuntimeError, "expected logvar on the device of mu (cpu), got meta"),
    ("gaussian_kl_per_dim", "mu on 'meta'", lambda: ops.gaussian_kl_per_dim(_x().to(META), _t()), RuntimeError, "expected logvar on the device of mu (meta), got cpu"),
    ("gaussian_kl_per_dim", "logvar of another shape, everything on 'meta'", lambda: ops.gaussian_kl_per_dim(_x().to(META), _t()[:, :2].to(META)), RuntimeError, "expected logvar of shape (3, 4) (the shape of mu), got (3, 2)"),
    ("gaussian_kl_per_dim", "0-d mu and logvar, everything on 'meta'", lambda: ops.gaussian_kl_per_dim(torch.zeros((), device=META), torch.zeros((), device=META)), RuntimeError, "expected mu of shape [batch, ...]"),
    # gaussian_kl_per_dim_backward
    ("gaussian_kl_per_dim_backward", "grad of shape [3]", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3), _x(), _t()), ValueError, "expected grad of shape [3, 4] (the shape of mu), got [3]"),
    ("gaussian_kl_per_dim_backward", "grad of shape [1, 4] (broadcastable)", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(1, 4), _x(), _t()), ValueError, "expected grad of shape [3, 4] (the shape of mu), got [1, 4]"),
    ("gaussian_kl_per_dim_backward", "grad of shape [3, 5]", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3, 5), _x(), _t()), ValueError, "expected grad of shape [3, 4] (the shape of mu), got [3, 5]"),
    ("gaussian_kl_per_dim_backward", "0-d grad", lambda: ops.gaussian_kl_per_dim_backward(torch.tensor(1.0), _x(), _t()), ValueError, "expected grad of shape [3, 4] (the shape of mu), got []"),
    ("gaussian_kl_per_dim_backward", "grad None", lambda: ops.gaussian_kl_per_dim_backward(None, _x(), _t()), RuntimeError, "tensor does not have a device"),
    ("gaussian_kl_per_dim_backward", "grad on 'meta'", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3, 4, device=META), _x(), _t()), RuntimeError, "expected grad on the device of mu (cpu), got meta"),
    ("gaussian_kl_per_dim_backward", "grad of shape [4], everything on 'meta'", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(4, device=META), _x().to(META), _t().to(META)), RuntimeError, "expected grad of shape (3, 4) (the shape of mu), got (4,)"),
    ("gaussian_kl_per_dim_backward", "logvar of another shape", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3, 4), _x(), _t()[:2]), ValueError, "expected logvar of shape [3, 4] (the shape of mu), got [2, 4]"),
    ("gaussian_kl_per_dim_backward", "float64 logvar, float32 mu", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3, 4), _x(), _t().double()), TypeError, "expected logvar of dtype Float (the dtype of mu), got Double"),
    ("gaussian_kl_per_dim_backward", "int64 mu and logvar", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3, 4), _x().long(), _t().long()), TypeError, "expected mu " + _FLOATING + "Long"),
    ("gaussian_kl_per_dim_backward", "0-d grad, mu and logvar", lambda: ops.gaussian_kl_per_dim_backward(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0)), ValueError, "expected mu of shape [batch, ...], got a 0-d tensor"),
    ("gaussian_kl_per_dim_backward", "logvar on 'meta'", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(3, 4), _x(), _t().to(META)), RuntimeError, "expected logvar on the device of mu (cpu), got meta"),
    # cb_log_normalizer(_backward)
    ("cb_log_normalizer", "int64 logits", lambda: ops.cb_log_normalizer(_x().long()), TypeError, "expected logits " + _FLOATING + "Long"),
    ("cb_log_normalizer", "bool logits", lambda: ops.cb_log_normalizer(_x() > 0), TypeError, "expected logits " + _FLOATING + "Bool"),
    ("cb_log_normalizer", "complex64 logits", lambda: ops.cb_log_normalizer(_x().to(torch.complex64)), TypeError, "expected logits " + _FLOATING + "ComplexFloat"),
    ("cb_log_normalizer", "None", lambda: ops.cb_log_normalizer(None), RuntimeError, "tensor does not have a device"),
    ("cb_log_normalizer_backward", "grad of shape [3]", lambda: ops.cb_log_normalizer_backward(torch.ones(3), _x()), ValueError, "expected grad of shape [3, 4] (the shape of logits), got [3]"),
    ("cb_log_normalizer_backward", "grad of shape [4] (broadcastable)", lambda: ops.cb_log_normalizer_backward(torch.ones(4), _x()), ValueError, "expected grad of shape [3, 4] (the shape of logits), got [4]"),
    ("cb_log_normalizer_backward", "grad with the same elements in another shape", lambda: ops.cb_log_normalizer_backward(torch.ones(4, 3), _x()), ValueError, "expected grad of shape [3, 4] (the shape of logits), got [4, 3]"),
    ("cb_log_normalizer_backward", "grad None", lambda: ops.cb_log_normalizer_backward(None, _x()), ValueError, "expected grad of shape [3, 4] (the shape of logits), got [0]"),
    ("cb_log_normalizer_backward", "grad on 'meta'", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4, device=META), _x()), RuntimeError, "expected grad on the device of logits (cpu), got meta"),
    # dmol_nll(_backward): params [2, 30, 3, 4] (K = 3), target [2, 3, 3, 4]
    ("dmol_nll", "int64 params", lambda: ops.dmol_nll(_dp().long(), _dt(), 8, -7.0), TypeError, "expected params " + _FLOATING + "Long"),
    ("dmol_nll", "int32 target", lambda: ops.dmol_nll(_dp(), _dt().int(), 8, -7.0), TypeError, "expected target to be a floating-point or uint8 tensor, got Int"),
    ("dmol_nll", "target of shape [2, 2, 3, 4]", lambda: ops.dmol_nll(_dp(), _dt()[:, :2], 8, -7.0), ValueError, "expected target of shape [B, 3, H, W] or [B, 1, H, W], got [2, 2, 3, 4]"),
    ("dmol_nll", "params of shape [2, 25, 3, 4]", lambda: ops.dmol_nll(_dp()[:, :25], _dt(), 8, -7.0), ValueError, "expected params of shape [B, 10K, H, W] for a target of shape [2, 3, 3, 4], got [2, 25, 3, 4]"),
    ("dmol_nll", "params of another batch size", lambda: ops.dmol_nll(_dp()[:1], _dt(), 8, -7.0), ValueError, "expected params of shape [B, 10K, H, W] for a target of shape [2, 3, 3, 4], got [1, 30, 3, 4]"),
    ("dmol_nll", "bits 0", lambda: ops.dmol_nll(_dp(), _dt(), 0, -7.0), ValueError, "expected bits in [1, 16], got 0"),
    ("dmol_nll", "log_scale_min inf", lambda: ops.dmol_nll(_dp(), _dt(), 8, float("inf")), ValueError, "expected a finite log_scale_min, got inf"),
    ("dmol_nll", "target on 'meta'", lambda: ops.dmol_nll(_dp(), _dt().to(META), 8, -7.0), RuntimeError, "expected target on the device of params"),
    ("dmol_nll_and_grad", "int64 params", lambda: ops.dmol_nll_and_grad(_dp().long(), _dt(), 8, -7.0), TypeError, "expected params " + _FLOATING + "Long"),
    ("dmol_nll_and_grad", "bits 17", lambda: ops.dmol_nll_and_grad(_dp(), _dt(), 17, -7.0), ValueError, "expected bits in [1, 16], got 17"),
    ("dmol_nll_backward", "grad of shape [3]", lambda: ops.dmol_nll_backward(torch.ones(3), _dp(), _dt(), 8, -7.0), ValueError, "expected grad of shape [2], got [3]"),
    ("dmol_nll_backward", "int64 params", lambda: ops.dmol_nll_backward(torch.ones(2), _dp().long(), _dt(), 8, -7.0), TypeError, "expected params " + _FLOATING + "Long"),
    ("dmol_nll_backward", "grad on 'meta'", lambda: ops.dmol_nll_backward(torch.ones(2, device=META), _dp(), _dt(), 8, -7.0), RuntimeError, "expected grad on the device of params"),
    ("dmol_nll_and_pixel_nll", "int64 params", lambda: ops.dmol_nll_and_pixel_nll(_dp().long(), _dt(), 8, -7.0), TypeError, "expected params " + _FLOATING + "Long"),
    ("dmol_nll_and_pixel_nll", "params of shape [2, 25, 3, 4]", lambda: ops.dmol_nll_and_pixel_nll(_dp()[:, :25], _dt(), 8, -7.0), ValueError, "expected params of shape [B, 10K, H, W] for a target of shape [2, 3, 3, 4], got [2, 25, 3, 4]"),
    ("dmol_nll_and_pixel_nll", "target on 'meta'", lambda: ops.dmol_nll_and_pixel_nll(_dp(), _dt().to(META), 8, -7.0), RuntimeError, "expected target on the device of params"),
    ("dmol_nll_backward", "pixel_nll of shape [2, 12]", lambda: ops.dmol_nll_backward(torch.ones(2), _dp(), _dt(), 8, -7.0, torch.zeros(2, 12)), ValueError, "expected pixel_nll of shape [2, 3, 4] (dmol_nll_and_pixel_nll's), got [2, 12]"),
    ("dmol_nll_backward", "float64 pixel_nll", lambda: ops.dmol_nll_backward(torch.ones(2), _dp(), _dt(), 8, -7.0, torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "expected pixel_nll of dtype Float (dmol_nll_and_pixel_nll's), got Double"),
    ("dmol_nll_backward", "pixel_nll on 'meta'", lambda: ops.dmol_nll_backward(torch.ones(2), _dp(), _dt(), 8, -7.0, torch.zeros(2, 3, 4, device=META)), RuntimeError, "expected pixel_nll on the device of params"),
    ("cb_log_normalizer_backward", "logits on 'meta'", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4), _x().to(META)), RuntimeError, "expected grad on the device of logits (meta), got cpu"),
    ("cb_log_normalizer_backward", "grad of shape [3], everything on 'meta'", lambda: ops.cb_log_normalizer_backward(torch.ones(3, device=META), _x().to(META)), RuntimeError, "expected grad of shape (3, 4) (the shape of logits), got (3,)"),
    ("cb_log_normalizer_backward", "int64 logits", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4), _x().long()), TypeError, "expected logits " + _FLOATING + "Long"),
    ("cb_log_normalizer_backward", "complex64 logits", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4), _x().to(torch.complex64)), TypeError, "expected logits " + _FLOATING + "ComplexFloat"),
    ("cb_log_normalizer_backward", "logits None", lambda: ops.cb_log_normalizer_backward(torch.ones(3, 4), None), RuntimeError, "tensor does not have a device"),
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
        "## `autoencoder_kl_loss` arguments",
        "",
        "`fusedvae.autoencoder_kl_loss`, `fusedvae.AutoencoderKLLoss` and the reference check",
        "their arguments under their own names before any fused op runs.",
        "",
        "| argument | bad value | exception | message fragment |",
        "|---|---|---|---|",
    ]
    for arg, bad, _, exc, fragment in AUTOENCODER_KL_CASES:
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
        "Apart from the bad input of its row each call is a good one: `vae_loss` and",
        "`vae_loss_backward` get float32 `recon` and `target` of shape [3, 2, 4], `mu` and",
        "`logvar` of shape [3, 5], `likelihood='bernoulli'` on logits, `reduction='batchmean'`,",
        "no `log_scale` or `beta`; the backward also a 0-d `grad_loss` and the forward's `aux`",
        "(2 + 2·3 + 5 = 13 elements). `dmol_nll` and its backward get float32 `params` of",
        "shape [2, 30, 3, 4] (K = 3) and `target` [2, 3, 3, 4], `bits=8`, `log_scale_min=-7`.",
        "The other ops get float32 tensors of shape [3, 4].",
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
    cases = VAE_LOSS_CASES + AUTOENCODER_KL_CASES + OP_CASES
    assert len(rows) == len(cases)
    for row, case in zip(rows, cases):
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
        assert cells[0] == f"`{case[0]}`" and cells[2] == f"`{case[3].__name__}`" and cells[3] == case[4]


# ----------------------------------------------------------- the tests ----


@pytest.mark.parametrize("fn", [fusedvae.vae_loss, reference.vae_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("case", VAE_LOSS_CASES, ids=[f"{c[0]}: {c[1]}" for c in VAE_LOSS_CASES])
def test_vae_loss_bad_argument(case, fn):
    arg, _, change, exc, fragment = case
    _assert_raises_naming(arg, exc, fragment, lambda: _call(fn, **change))


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


@pytest.mark.parametrize(
    "fn", [fusedvae.autoencoder_kl_loss, reference.autoencoder_kl_loss], ids=["fused", "reference"]
)
@pytest.mark.parametrize("case", AUTOENCODER_KL_CASES, ids=[f"{c[0]}: {c[1]}" for c in AUTOENCODER_KL_CASES])
def test_autoencoder_kl_loss_bad_argument(case, fn):
    arg, _, change, exc, fragment = case
    _assert_raises_naming(arg, exc, fragment, lambda: _call_autoencoder_kl(fn, **change))


def test_autoencoder_kl_loss_every_argument_has_rows():
    import inspect

    names = set(inspect.signature(fusedvae.autoencoder_kl_loss).parameters)
    kinds = {}
    for arg, _, _, exc, _ in AUTOENCODER_KL_CASES:
        kinds.setdefault(arg, set()).add(exc)
    assert set(kinds) == names, set(kinds) ^ names
    for arg in names:
        assert kinds[arg] == {TypeError, ValueError}, arg


@pytest.mark.parametrize("case", OP_CASES, ids=[f"{c[0]}: {c[1]}" for c in OP_CASES])
def test_direct_op_bad_input(case):
    _, _, call, exc, fragment = case
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, (RuntimeError, ValueError, TypeError))
    message = str(info.value)
    assert fragment in message, message
    if not fragment.startswith(TORCH_MESSAGES):
        # fusedvae's own checks, in C++ or in the fake kernels, say what they expected.
        assert message.startswith(("fusedvae: expected ", "fusedvae: likelihood ")), message


def test_every_op_has_rows():
    ops_in_table = {c[0] for c in OP_CASES}
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("fusedvae::")}
    assert schemas == ops_in_table, schemas ^ ops_in_table
    # ... and every op has rows that fusedvae's own checks answer (not only
    # torch's schema and None handling), with a TypeError (dtype) row and a
    # ValueError (shape, string or range) row for each op that checks dtypes.
    kinds = {}
    for op, _, _, exc, fragment in OP_CASES:
        if not fragment.startswith(TORCH_MESSAGES):
            kinds.setdefault(op, set()).add(exc)
    assert set(kinds) == schemas, schemas - set(kinds)
    for op in schemas - {"cb_log_normalizer"}:  # its only checked argument is the logits' dtype
        assert {TypeError, ValueError} <= kinds[op], (op, kinds[op])


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
        # the ops still work afterwards: 3 Bernoulli log 2 per sample, no KL
        x, z = torch.zeros(2, 3), torch.zeros(2, 1)
        loss, rec, kl, aux = torch.ops.fusedvae.vae_loss(
            x, torch.full((2, 3), 0.5), z, z, None, None, "bernoulli", True, "none", 0.0, False, 1.0, 0.0)
        assert torch.allclose(loss, torch.full((2,), 3 * 0.6931471805599453)), loss
        assert torch.equal(kl, torch.zeros(2)), kl
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
    # recon and target [3, 2, 3, 4], mu and logvar [3, 5], float32.
    img = _good_image_batch()
    x = torch.randn(3, 4)
    t = torch.rand(3, 4)

    def loss(**change):
        return _loss(img, **change)

    def loss_backward(**change):
        return _loss_backward(img, **change)

    return [
        ("int recon", lambda: loss(recon=lambda a: a["recon"].long())),
        ("int target", lambda: loss(target=lambda a: a["target"].int())),
        ("target dtype", lambda: loss(target=lambda a: a["target"].double())),
        ("target shape", lambda: loss(target=lambda a: a["target"][:, :1])),
        ("target numel same, shape differs", lambda: loss(target=lambda a: a["target"].reshape(3, 2, 4, 3))),
        ("0-d recon", lambda: loss(recon=lambda a: a["recon"][0, 0, 0, 0], target=lambda a: a["target"][0, 0, 0, 0])),
        ("mu batch", lambda: loss(mu=lambda a: a["mu"][:2], logvar=lambda a: a["logvar"][:2])),
        ("mu dtype", lambda: loss(mu=lambda a: a["mu"].double(), logvar=lambda a: a["logvar"].double())),
        ("logvar shape", lambda: loss(logvar=lambda a: a["logvar"][:, :4])),
        ("logvar dtype", lambda: loss(logvar=lambda a: a["logvar"].half())),
        ("likelihood", lambda: loss(likelihood="poisson")),
        ("reduction", lambda: loss(reduction="avg")),
        ("bernoulli with log_scale", lambda: loss(log_scale=torch.zeros(()))),
        ("cbernoulli with optimal_scale", lambda: loss(likelihood="cbernoulli", optimal_scale=True)),
        ("per-channel log_scale, batch 2", lambda: loss(likelihood="gaussian", log_scale=torch.zeros(2, 1, 1, 1))),
        ("log_scale dtype", lambda: loss(likelihood="gaussian", log_scale=torch.zeros(2, 1, 1, dtype=torch.float64))),
        ("beta int", lambda: loss(beta=torch.tensor(1))),
        ("beta shape", lambda: loss(beta=torch.ones(3))),
        ("free_bits", lambda: loss(free_bits=-0.5)),
        ("bwd aux shape", lambda: loss_backward(aux=lambda a: a["aux"][1:])),
        ("bwd aux dtype", lambda: loss_backward(aux=lambda a: a["aux"].half())),
        ("bwd grad_loss shape", lambda: loss_backward(grad_loss=torch.ones(3))),
        ("bwd grad_loss 0-d, reduction none", lambda: loss_backward(reduction="none")),
        ("bwd grad_rec shape", lambda: loss_backward(grad_rec=torch.ones(2))),
        ("bwd grad_kl 2-d", lambda: loss_backward(grad_kl=torch.ones(3, 1))),
        ("bwd target shape", lambda: loss_backward(target=lambda a: a["target"][:2])),
        ("kl shape", lambda: ops.gaussian_kl_per_dim(x, t[:, :2])),
        ("kl dtype", lambda: ops.gaussian_kl_per_dim(x, t.double())),
        ("kl int", lambda: ops.gaussian_kl_per_dim(x.int(), t.int())),
        ("kl 0-d", lambda: ops.gaussian_kl_per_dim(x[0, 0], t[0, 0])),
        ("kl bwd grad shape", lambda: ops.gaussian_kl_per_dim_backward(torch.ones(4), x, t)),
        ("cb int", lambda: ops.cb_log_normalizer(x.long())),
        ("cb bwd grad shape", lambda: ops.cb_log_normalizer_backward(torch.ones(3), x)),
    ]


DIRECT_BAD = _direct_bad_calls()


@pytest.mark.parametrize("call", DIRECT_BAD, ids=[c[0] for c in DIRECT_BAD])
def test_direct_op_bad_input_raises(call):
    # TORCH_CHECK_VALUE/TYPE surface as ValueError/TypeError, TORCH_CHECK as RuntimeError.
    with pytest.raises((RuntimeError, ValueError, TypeError), match="^fusedvae: "):
        call[1]()


@pytest.mark.parametrize(
    "op_call",
    [
        ("vae_loss target on meta", lambda: _loss(**_meta("target"))),
        ("vae_loss recon on meta", lambda: _loss(**_meta("recon"))),
        ("vae_loss mu on meta", lambda: _loss(**_meta("mu"))),
        ("vae_loss logvar on meta", lambda: _loss(**_meta("logvar"))),
        ("vae_loss mu and logvar on meta", lambda: _loss(**_meta("mu", "logvar"))),
        ("vae_loss_backward target on meta", lambda: _loss_backward(**_meta("target"))),
        ("vae_loss_backward mu and logvar on meta", lambda: _loss_backward(**_meta("mu", "logvar"))),
        ("gaussian_kl_per_dim logvar on meta", lambda: ops.gaussian_kl_per_dim(_x(), _t().to(META))),
        ("gaussian_kl_per_dim_backward grad on meta", lambda: ops.gaussian_kl_per_dim_backward(_x().to(META), _x(), _t())),
        ("cb_log_normalizer_backward grad on meta", lambda: ops.cb_log_normalizer_backward(_x().to(META), _x())),
    ],
    ids=lambda c: c[0],
)
def test_direct_op_mixed_devices_raises(op_call):
    # The rest on the CPU, one tensor on 'meta': like every aten op
    # ("Tensor on device meta is not on the expected device cpu!") this must
    # raise, not hand back an uninitialised CPU tensor.
    with pytest.raises((RuntimeError, ValueError)):
        out = op_call[1]()
        pytest.fail(f"no error; returned {out}")


if __name__ == "__main__":
    with open(DOC, "w") as f:
        f.write(render())
    print(f"wrote {DOC}")
