r"""Diagnostics of a VAE: rate, distortion, ELBO, bits per dimension, active units.

All quantities are in nats unless the name says bits. ``rate``, ``distortion``,
``elbo`` and :func:`kl_per_dim` are differentiable; :func:`bits_per_dim` is
differentiable for a tensor input; :func:`active_units` is a no-grad summary
that returns a Python ``int`` (it syncs with the device once).
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Union, overload

import torch
from torch import Tensor

from . import _args, _checks
from ._ops import ops
from .reference import VAELossOutput

__all__ = [
    "ActiveUnits",
    "active_units",
    "bits_per_dim",
    "distortion",
    "elbo",
    "kl_per_dim",
    "rate",
]


def rate(out: VAELossOutput) -> Tensor:
    r"""The rate :math:`R = \frac1B\sum_b \mathrm{KL}(q(z|x_b)\,\|\,p(z))`, in nats.

    The average KL of the posterior from the prior, an upper bound on the
    information the code carries about the data (Alemi et al., 2018, "Fixing a
    Broken ELBO").

    Args:
        out (VAELossOutput): the output of :func:`fusedvae.vae_loss`.

    Returns:
        Tensor: a 0-d tensor, ``out.kl.mean()``.
    """
    _, kl = _args.rec_kl(out)
    return kl.mean()


def distortion(out: VAELossOutput) -> Tensor:
    r"""The distortion :math:`D = \frac1B\sum_b -\mathbb{E}_q[\log p(x_b|z)]`, in nats.

    The average reconstruction negative log-likelihood (Alemi et al., 2018, "Fixing a
    Broken ELBO"), a one-sample estimate for each data point.

    Args:
        out (VAELossOutput): the output of :func:`fusedvae.vae_loss`.

    Returns:
        Tensor: a 0-d tensor, ``out.rec.mean()``.
    """
    rec, _ = _args.rec_kl(out)
    return rec.mean()


def elbo(out: VAELossOutput) -> Tensor:
    r"""The evidence lower bound per sample, :math:`-\frac1B\sum_b(\text{rec}_b + \text{kl}_b) = -(D + R)`.

    Kingma & Welling (2014), "Auto-Encoding Variational Bayes", Eq. (10): a
    one-sample estimate of :math:`\mathbb{E}_q[\log p(x|z)] - \mathrm{KL}(q\,\|\,p)`
    with the KL in closed form, in nats per sample (β = 1 whatever ``beta`` the
    loss was computed with). It bounds :math:`\log p(x)` from below.

    Args:
        out (VAELossOutput): the output of :func:`fusedvae.vae_loss`.

    Returns:
        Tensor: a 0-d tensor.
    """
    rec, kl = _args.rec_kl(out)
    return -(rec + kl).mean()


@overload
def bits_per_dim(
    nll_nats_per_sample: Tensor, num_dims: int, *, pixel_levels: int = ..., data_scaled_to_unit: bool = ...,
    discrete: bool = ...,
) -> Tensor: ...


@overload
def bits_per_dim(
    nll_nats_per_sample: float, num_dims: int, *, pixel_levels: int = ..., data_scaled_to_unit: bool = ...,
    discrete: bool = ...,
) -> float: ...


def bits_per_dim(nll_nats_per_sample, num_dims, *, pixel_levels=256, data_scaled_to_unit=True, discrete=False):
    r"""Convert a negative log-likelihood in nats per sample to bits per dimension.

    .. math::
        \text{bpd} = \frac{\text{NLL}}{D \ln 2} \quad (\texttt{discrete=True}), \qquad
        \text{bpd} = \frac{\text{NLL}}{D \ln 2} + \log_2 L
        \quad (\texttt{discrete=False}, \texttt{data\_scaled\_to\_unit=True}: \text{the default})

    with :math:`D` = ``num_dims`` and :math:`L` = ``pixel_levels``; with
    ``discrete=False`` and ``data_scaled_to_unit=False`` the first formula too.

    **Discrete likelihoods** (``discrete=True``) give the probability of the data
    themselves, so their NLL is already a code length and nothing is added:
    :func:`fusedvae.discretized_mix_logistic_nll` (the probability of each pixel's
    bin of the :math:`2^\text{bits}` levels, whatever scale the target is read at;
    the ``[-1, 1]`` scaling it uses is no reason for a correction), ``"bernoulli"`` on
    binarised data, or any other distribution over the :math:`L` levels.
    ``data_scaled_to_unit`` is then ignored: it describes what a density is defined on.

    **Continuous densities** (``discrete=False``, the default) on data scaled to
    :math:`[0, 1]` (``data_scaled_to_unit=True``, the default) get :math:`\log_2 L`
    bits more (8-bit: :math:`L = 256`, +8 bits/dim): ``"gaussian"``, ``"laplace"`` or
    ``"cbernoulli"`` with ``target`` in ``[0, 1]`` or as uint8 pixels (which
    :func:`fusedvae.vae_loss` reads as ``value / 255``). A density on
    :math:`[0,1]^D` and the density of the same model on the pixel scale
    :math:`[0, L)^D` differ by the Jacobian :math:`L^{-D}`, so :math:`-\log_2 p` on
    the pixel scale is :math:`D\log_2 L` bits larger, and it is that number which
    bounds the discrete model's code length when the data are dequantised with
    uniform noise (Theis et al., 2016, "A note on the evaluation of generative
    models"). Without dequantisation a density on discrete data can be made
    arbitrarily large and the figure is not a bound at all. A density on data left
    on the pixel scale takes ``data_scaled_to_unit=False``. (The Bernoulli
    likelihood on grey levels is neither a density nor a distribution over the
    levels, so its bits/dim are not comparable with either.)

    Args:
        nll_nats_per_sample (Tensor or float): the negative log-likelihood (or
            negative ELBO, for a bound) of each sample in nats, e.g. ``out.rec + out.kl``.
            Any shape; the conversion is elementwise.
        num_dims (int): :math:`D`, the dimensions of one sample (e.g. ``3*32*32``).
        pixel_levels (int, optional): :math:`L`, the number of levels of the
            discrete data (>= 2); used only for a density on data scaled to unit.
            Default: ``256``.
        data_scaled_to_unit (bool, optional): for a density (``discrete=False``),
            whether its data were scaled to :math:`[0, 1]`: add :math:`\log_2 L`.
            Default: ``True``.
        discrete (bool, optional): whether the NLL is that of a discrete
            likelihood (see above): add nothing. Default: ``False``.

    Returns:
        Tensor or float: bits per dimension, of the type and shape of the input.

    Example::

        >>> # a discretized mixture of logistics on 8-bit images: NLL / (D ln 2)
        >>> nll = fusedvae.discretized_mix_logistic_nll(params, images_uint8)
        >>> fusedvae.diagnostics.bits_per_dim(nll + kl, num_dims=3 * 32 * 32, discrete=True).mean()
        >>> # a Gaussian density on the same images read as value / 255: + 8 bits/dim
        >>> out = fusedvae.vae_loss(mean, images_uint8, mu, logvar, likelihood="gaussian")
        >>> fusedvae.diagnostics.bits_per_dim(out.rec + out.kl, num_dims=3 * 32 * 32).mean()
    """
    num_dims = _args.check_positive_int(num_dims, "num_dims")
    if not _args.is_int(pixel_levels) or pixel_levels < 2:
        raise ValueError(f"pixel_levels must be an int >= 2, got {pixel_levels!r}")
    for name, flag in (("data_scaled_to_unit", data_scaled_to_unit), ("discrete", discrete)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(nll_nats_per_sample, Tensor):
        if not nll_nats_per_sample.dtype.is_floating_point:
            raise TypeError(f"nll_nats_per_sample must be a floating-point tensor, got dtype {nll_nats_per_sample.dtype}")
    elif _args.is_real(nll_nats_per_sample):
        nll_nats_per_sample = float(nll_nats_per_sample)
    else:
        raise TypeError(f"nll_nats_per_sample must be a tensor or a float, got {type(nll_nats_per_sample).__name__}")
    bpd = nll_nats_per_sample / (num_dims * math.log(2.0))
    if data_scaled_to_unit and not discrete:
        bpd = bpd + math.log2(pixel_levels)
    return bpd


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    r"""KL of each latent dimension, :math:`\tfrac12(\mu_{bj}^2 + e^{\text{lv}_{bj}} - 1 - \text{lv}_{bj})`.

    The KL of the diagonal Gaussian posterior from :math:`\mathcal{N}(0, I)` splits
    over dimensions (Kingma & Welling, 2014, "Auto-Encoding Variational Bayes",
    App. B); its rows sum to the ``kl`` of :func:`fusedvae.vae_loss`. The batch mean
    of each column is the per-dimension rate that free bits act on, and columns
    near 0 mark collapsed dimensions. Computed by the fused
    ``torch.ops.fusedvae.gaussian_kl_per_dim`` op; differentiable.

    Args:
        mu (Tensor): posterior mean, ``[B, ...]`` (a flat code or a spatial latent).
        logvar (Tensor): posterior log-variance, shaped like ``mu``.

    Returns:
        Tensor: ``[B, J]``, J the elements of one sample of ``mu`` (flattened in
        ``mu``'s logical order); float32 (float64 for float64 inputs).
    """
    _checks._check_float_tensor(mu, "mu")
    _checks._check_float_tensor(logvar, "logvar")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if logvar.device != mu.device:
        raise ValueError(f"logvar must be on the device of mu ({mu.device}), got {logvar.device}")
    if mu.dtype != logvar.dtype:
        dtype = torch.promote_types(mu.dtype, logvar.dtype)
        mu, logvar = mu.to(dtype), logvar.to(dtype)
    return ops.gaussian_kl_per_dim(mu, logvar).reshape(mu.shape[0], -1)


class ActiveUnits(NamedTuple):
    """What :func:`active_units` returns.

    Attributes:
        count: the number of active latent dimensions.
        variances: ``[J]``, the variance over the data of each dimension's posterior mean.
    """

    count: int
    variances: Tensor


def active_units(
    mu: Union[Tensor, Iterable[Tensor]],
    threshold: float = 0.01,
) -> ActiveUnits:
    r"""Count the active latent units of Burda et al. (2016).

    A unit :math:`u` is active when its posterior mean varies over the data:

    .. math::
        A_u = \operatorname{Cov}_x\!\left(\mathbb{E}_{u \sim q(u|x)}[u]\right) > \text{threshold}

    (Burda et al., 2016, "Importance Weighted Autoencoders", with
    threshold :math:`10^{-2}`). An inactive unit's posterior ignores the input:
    the dimension has collapsed to the prior.

    The variance is the unbiased sample variance over the N data points (as
    :func:`torch.var`'s default). A single tensor ``[N, J]`` or ``[N, ...]``
    (flattened to ``[N, J]``) holds the means of the whole data set; an iterable
    of such batches (a generator over a data loader, say) is reduced in one
    pass with the pairwise update of Chan, Golub & LeVeque (1983), "Algorithms
    for computing the sample variance", which is exact in exact arithmetic and
    stable where the sum-of-squares formula cancels. Statistics accumulate in
    float64 on the batches' device.

    Args:
        mu (Tensor or iterable of Tensor): the posterior means over the data set,
            ``[N, ...]``, or batches ``[n_i, ...]`` of the same per-sample shape.
        threshold (float, optional): the activity threshold (>= 0). Default: ``0.01``.

    Returns:
        ActiveUnits: ``(count, variances)``; ``count`` a Python int, ``variances``
        ``[J]`` in float32 (float64 for float64 means).

    Example::

        >>> with torch.no_grad():
        ...     count, var = active_units(encoder(x)[0] for x, _ in loader)
    """
    threshold = _args.check_nonnegative(threshold, "threshold")
    batches = (mu,) if isinstance(mu, Tensor) else mu
    try:
        batches = iter(batches)
    except TypeError:
        raise TypeError(f"mu must be a tensor or an iterable of tensors, got {type(mu).__name__}") from None

    n = 0
    mean = m2 = None
    result_dtype = torch.float32
    with torch.no_grad():
        for batch in batches:
            if not isinstance(batch, Tensor):
                raise TypeError(f"mu must hold tensors, got {type(batch).__name__}")
            if not batch.dtype.is_floating_point or batch.dim() < 1:
                raise ValueError(
                    f"mu must hold floating-point tensors of shape [N, ...], got dtype {batch.dtype} "
                    f"and shape {tuple(batch.shape)}"
                )
            x = batch.detach().reshape(batch.shape[0], math.prod(batch.shape[1:])).to(torch.float64)
            if mean is not None and (x.shape[1] != mean.shape[0] or x.device != mean.device):
                raise ValueError(
                    f"every batch of mu must have {mean.shape[0]} elements per sample on {mean.device}, "
                    f"got shape {tuple(batch.shape)} on {batch.device}"
                )
            if batch.dtype == torch.float64:
                result_dtype = torch.float64
            n_b = x.shape[0]
            if n_b == 0:
                continue
            mean_b = x.mean(dim=0)
            m2_b = (x - mean_b).square().sum(dim=0)
            if mean is None:
                n, mean, m2 = n_b, mean_b, m2_b
                continue
            total = n + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta.square() * (n * n_b / total)
            n = total
    if n < 2:
        raise ValueError(f"mu must hold at least 2 data points to estimate a variance, got {n}")
    variances = m2 / (n - 1)
    count = int((variances > threshold).sum().item())
    return ActiveUnits(count, variances.to(result_dtype))
