r"""KL-weight schedules: callables ``step -> beta``.

Every schedule takes the training step in one of two forms:

- a Python ``int`` (or ``float``): the value comes back as a Python ``float``;
- a tensor of integer or floating dtype (typically 0-d): the value comes back as a
  tensor of the same shape on the same device, computed with torch ops only (no
  ``.item()``, no Python branch on its value), so the schedule runs inside a
  ``torch.compile``'d step without a graph break or a host sync. An integer step
  gives a tensor of the default floating dtype; a floating step keeps its dtype.

``write_(beta, step)`` writes the value into an existing floating tensor in place
(``fill_`` for a Python step, ``copy_`` for a tensor step) and returns it. Hand a
0-d ``beta`` tensor to :func:`fusedvae.vae_loss` (or :class:`fusedvae.VAELoss`) once
and let the schedule update it: the loss keeps seeing the same tensor, so a
compiled training step is neither retraced nor recompiled when β changes::

    >>> beta = torch.zeros((), device="cuda")
    >>> step = torch.zeros((), dtype=torch.int64, device="cuda")
    >>> schedule = fusedvae.schedules.CyclicalAnneal(total_steps=100_000)
    >>> @torch.compile(fullgraph=True)
    ... def train_step(x):
    ...     schedule.write_(beta, step)
    ...     out = fusedvae.vae_loss(model(x), x, *encoder(x), beta=beta)
    ...     step.add_(1)
    ...     return out.loss

Call ``write_`` before the loss that reads ``beta`` is computed, or after its
``backward()``: autograd saves ``beta`` for the backward pass of ``beta * kl``, and
an in-place write in between is reported as an error by autograd.

Steps before 0 count as step 0 in :class:`LinearWarmup`, :class:`CyclicalAnneal` and
:class:`CapacitySchedule`; :class:`SigmoidAnneal` evaluates its formula for any step.
"""
from __future__ import annotations

import math
from typing import Union, overload

import torch
from torch import Tensor

from . import _args
from .reference import VAELossOutput

__all__ = ["LinearWarmup", "SigmoidAnneal", "CyclicalAnneal", "CapacitySchedule"]

Step = Union[int, float, Tensor]


def _step_float(step: Tensor) -> Tensor:
    """A tensor step in a floating dtype (the default one for integer steps)."""
    return step if step.dtype.is_floating_point else step.to(torch.get_default_dtype())


# -------------------------------------------------------------------- base --


class _Schedule:
    """Dispatch ``step`` to the Python-float or the tensor formula; provide ``write_``."""

    @overload
    def __call__(self, step: Tensor) -> Tensor: ...

    @overload
    def __call__(self, step: Union[int, float]) -> float: ...

    def __call__(self, step):
        if isinstance(step, Tensor):
            if step.dtype == torch.bool or step.is_complex():
                raise TypeError(f"step must be an integer or floating-point tensor, got dtype {step.dtype}")
            return self._tensor(step)
        if _args.is_real(step):
            return self._float(step)
        raise TypeError(f"step must be an int, a float or a tensor, got {type(step).__name__}")

    def write_(self, beta: Tensor, step: Step) -> Tensor:
        """Write the value at ``step`` into ``beta`` in place and return ``beta``.

        Args:
            beta (Tensor): a floating-point tensor, typically 0-d (the ``beta`` handed
                to :func:`fusedvae.vae_loss`); its identity, device and dtype are kept.
            step (int or Tensor): the training step. A tensor step is copied with
                ``copy_`` (no host sync when it is on ``beta``'s device); a Python
                step with ``fill_``.
        """
        if not isinstance(beta, Tensor):
            raise TypeError(f"beta must be a torch.Tensor, got {type(beta).__name__}")
        if not beta.dtype.is_floating_point:
            raise TypeError(f"beta must be a floating-point tensor, got dtype {beta.dtype}")
        value = self(step)
        if isinstance(value, Tensor):
            return beta.copy_(value)
        return beta.fill_(value)

    def _float(self, step: Union[int, float]) -> float:
        raise NotImplementedError

    def _tensor(self, step: Tensor) -> Tensor:
        raise NotImplementedError


# --------------------------------------------------------------- schedules --


class LinearWarmup(_Schedule):
    r"""Linear KL warm-up: β rises linearly from ``start`` to ``end``, then stays.

    .. math::
        \beta(t) = \text{start} + (\text{end} - \text{start})\cdot
        \min\!\left(1, \frac{\max(t, 0)}{T}\right)

    with :math:`T` = ``warmup_steps``. KL warm-up of this kind goes back to
    Bowman et al. (2016), "Generating Sentences from a Continuous Space", and
    Sønderby et al. (2016), "Ladder Variational Autoencoders", where β rises
    linearly from 0 to 1.

    Args:
        warmup_steps (int): :math:`T`, steps to go from ``start`` to ``end`` (> 0).
        start (float, optional): β at step 0. Default: ``0.0``.
        end (float, optional): β from step ``warmup_steps`` on. Default: ``1.0``.

    Example::

        >>> schedule = LinearWarmup(10_000)
        >>> schedule(2_500)
        0.25
    """

    def __init__(self, warmup_steps: int, start: float = 0.0, end: float = 1.0) -> None:
        self.warmup_steps = _args.check_positive_int(warmup_steps, "warmup_steps")
        self.start = _args.check_finite(start, "start")
        self.end = _args.check_finite(end, "end")

    def _float(self, step):
        fraction = min(1.0, max(step, 0) / self.warmup_steps)
        return self.start + (self.end - self.start) * fraction

    def _tensor(self, step):
        fraction = torch.clamp(_step_float(step) / self.warmup_steps, min=0.0, max=1.0)
        return self.start + (self.end - self.start) * fraction

    def __repr__(self) -> str:
        return f"LinearWarmup(warmup_steps={self.warmup_steps}, start={self.start}, end={self.end})"


class SigmoidAnneal(_Schedule):
    r"""Logistic KL annealing of Bowman et al. (2016).

    .. math::
        \beta(t) = \frac{1}{1 + \exp(-k\,(t - x_0))}

    (Bowman et al., 2016, "Generating Sentences from a Continuous Space": KL cost
    annealing with a logistic function). β is ½ at :math:`t = x_0` and the slope there
    is :math:`k/4`. Evaluated without overflow for every step.

    Args:
        k (float, optional): steepness (> 0). Default: ``0.0025``.
        x0 (float, optional): the step at which β = ½. Default: ``2500``.

    With the defaults (k = 0.0025, x0 = 2500, common in re-implementations of the
    paper) β is 0.0019 at step 0, ½ at step 2500 and 0.998 at step 5000.
    """

    def __init__(self, k: float = 0.0025, x0: float = 2500) -> None:
        self.k = _args.check_positive(k, "k")
        self.x0 = _args.check_finite(x0, "x0")

    def _float(self, step):
        z = self.k * (step - self.x0)
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def _tensor(self, step):
        return torch.sigmoid(self.k * (_step_float(step) - self.x0))

    def __repr__(self) -> str:
        return f"SigmoidAnneal(k={self.k}, x0={self.x0})"


class CyclicalAnneal(_Schedule):
    r"""Cyclical KL annealing of Fu et al. (2019).

    The first ``total_steps`` steps are split into ``n_cycles`` cycles of
    :math:`P = T / M` steps (:math:`T` = ``total_steps``, :math:`M` = ``n_cycles``).
    Within each cycle β rises linearly from 0 to ``max_beta`` over the first
    fraction :math:`R` (``ratio``) of the cycle, then stays at ``max_beta``:

    .. math::
        \tau(t) = \frac{\operatorname{mod}(t, P)}{P}, \qquad
        \beta(t) = \beta_{\max}\cdot\min\!\left(1, \frac{\tau(t)}{R}\right)
        \quad (0 \le t < T), \qquad \beta(t) = \beta_{\max} \quad (t \ge T)

    (Fu et al., 2019, "Cyclical Annealing Schedule: A Simple Approach to Mitigating
    KL Vanishing"). For an integer step, :math:`\tau` is computed exactly
    as :math:`\operatorname{mod}(tM, T) / T`. When :math:`T/M` is not an integer the
    cycles keep their exact real length :math:`T/M` (cycle :math:`c` starts at the
    first step :math:`\ge cT/M`); implementations that round the cycle length to
    whole steps differ from it by at most a step at each boundary. ``ratio=0``
    gives β = ``max_beta`` at every step.

    Args:
        total_steps (int): :math:`T`, the steps covered by the cycles (> 0).
        n_cycles (int, optional): :math:`M` (>= 1). Default: ``4`` (the paper's choice).
        ratio (float, optional): :math:`R`, the increasing part of each cycle,
            in ``[0, 1]``. Default: ``0.5`` (the paper's choice).
        max_beta (float, optional): β of the flat part (>= 0). Default: ``1.0``.
    """

    def __init__(self, total_steps: int, n_cycles: int = 4, ratio: float = 0.5, max_beta: float = 1.0) -> None:
        self.total_steps = _args.check_positive_int(total_steps, "total_steps")
        if not _args.is_int(n_cycles) or n_cycles < 1:
            raise ValueError(f"n_cycles must be an int >= 1, got {n_cycles!r}")
        self.n_cycles = int(n_cycles)
        ratio = _args.check_finite(ratio, "ratio")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must satisfy 0 <= ratio <= 1, got {ratio!r}")
        self.ratio = ratio
        self.max_beta = _args.check_nonnegative(max_beta, "max_beta")

    def _float(self, step):
        if self.ratio == 0.0 or step >= self.total_steps:
            return self.max_beta
        step = max(step, 0)
        if _args.is_int(step):  # exact: mod(t·M, T) in integers
            tau = (step * self.n_cycles % self.total_steps) / self.total_steps
        else:
            tau = math.fmod(step * self.n_cycles, self.total_steps) / self.total_steps
        return self.max_beta * min(1.0, tau / self.ratio)

    def _tensor(self, step):
        t = torch.clamp(step, min=0)
        cycle_pos = torch.remainder(t * self.n_cycles, self.total_steps)  # exact for integer steps
        tau = _step_float(cycle_pos) / self.total_steps
        if self.ratio == 0.0:  # a constructor argument, not a tensor value
            rising = torch.ones_like(tau)
        else:
            rising = torch.clamp(tau / self.ratio, max=1.0)
        rising = torch.where(t >= self.total_steps, torch.ones_like(rising), rising)
        return self.max_beta * rising

    def __repr__(self) -> str:
        return (
            f"CyclicalAnneal(total_steps={self.total_steps}, n_cycles={self.n_cycles}, "
            f"ratio={self.ratio}, max_beta={self.max_beta})"
        )


class CapacitySchedule(_Schedule):
    r"""Controlled capacity increase of Burgess et al. (2018).

    The objective is

    .. math::
        \mathcal{L} = \frac1B\sum_b \text{rec}_b
        + \gamma\,\left|\frac1B\sum_b \text{kl}_b - C(t)\right|, \qquad
        C(t) = C_{\max}\cdot\min\!\left(1, \frac{\max(t, 0)}{S}\right)

    (Burgess et al., 2018, "Understanding disentangling in β-VAE"), with
    :math:`S` = ``steps``: the KL is pulled towards a capacity :math:`C` (in nats)
    that grows linearly from 0 to ``c_max``, so the latent code is allowed to carry
    more information as training goes on.

    Calling the schedule (and ``write_``) gives the capacity :math:`C(t)`, like
    :meth:`capacity`. :meth:`loss` builds the objective from the per-sample ``rec``
    and ``kl`` of a :class:`fusedvae.VAELossOutput`; ``out.loss`` is not used, so
    call :func:`fusedvae.vae_loss` with any ``beta`` and ``reduction`` (``beta=0.0``,
    say)::

        >>> schedule = CapacitySchedule(c_max=25.0, steps=100_000, gamma=1000.0)
        >>> out = fusedvae.vae_loss(recon, images, mu, logvar, beta=0.0)
        >>> schedule.loss(out, step).backward()

    Args:
        c_max (float, optional): :math:`C_{\max}`, the final capacity in nats (>= 0).
            Default: ``25.0``.
        steps (int, optional): :math:`S`, steps over which :math:`C` rises (> 0).
            Default: ``100000``.
        gamma (float, optional): :math:`\gamma`, weight of the capacity term (> 0).
            Default: ``1000.0``.

    The defaults are the paper's dSprites setting (γ = 1000, C rising linearly
    to 25 nats over 100 000 iterations).
    """

    def __init__(self, c_max: float = 25.0, steps: int = 100000, gamma: float = 1000.0) -> None:
        self.c_max = _args.check_nonnegative(c_max, "c_max")
        self.steps = _args.check_positive_int(steps, "steps")
        self.gamma = _args.check_positive(gamma, "gamma")

    def _float(self, step):
        return self.c_max * min(1.0, max(step, 0) / self.steps)

    def _tensor(self, step):
        return self.c_max * torch.clamp(_step_float(step) / self.steps, min=0.0, max=1.0)

    @overload
    def capacity(self, step: Tensor) -> Tensor: ...

    @overload
    def capacity(self, step: Union[int, float]) -> float: ...

    def capacity(self, step):
        """The capacity :math:`C(t)` in nats: a float for a Python step, a tensor for a tensor step."""
        return self(step)

    def loss(self, out: VAELossOutput, step: Step) -> Tensor:
        r"""The capacity objective :math:`\text{mean}_b\,\text{rec}_b + \gamma\,|\text{mean}_b\,\text{kl}_b - C(t)|`.

        Args:
            out (VAELossOutput): the output of :func:`fusedvae.vae_loss`; only its
                per-sample ``rec`` and ``kl`` are used, and the gradient flows through both.
            step (int or Tensor): the training step :math:`t`.

        Returns:
            Tensor: a 0-d tensor.
        """
        rec, kl = _args.rec_kl(out)
        return rec.mean() + self.gamma * torch.abs(kl.mean() - self.capacity(step))

    def __repr__(self) -> str:
        return f"CapacitySchedule(c_max={self.c_max}, steps={self.steps}, gamma={self.gamma})"

