r"""Feedback controllers that set the KL/reconstruction balance during training.

- :class:`GECO` (Rezende & Viola, 2018) turns "reconstruct at least this well" into
  a constraint with a Lagrange multiplier λ on the reconstruction term.
- :class:`ControlVAE` (Shao et al., 2020) steers β with a PI controller so that
  the KL settles at a chosen value.

Both are :class:`torch.nn.Module` subclasses whose state lives in 0-d buffers, so
``.to()``, ``state_dict()`` and ``load_state_dict()`` work as for any module. The
buffers follow the incoming tensors: on each call they are moved to the device
and floating dtype of the loss terms (a no-op after the first call), so a
controller built on the CPU works on CUDA as is. Each update is a handful of
0-d tensor ops with no ``.item()`` and no Python branch on a tensor value: no
host sync per step, and the updates trace into a ``torch.compile`` graph.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from . import _args
from .reference import VAELossOutput

__all__ = ["GECO", "ControlVAE"]


def _follow(module: nn.Module, names, ref: Tensor) -> None:
    """Move floating buffers ``names`` of ``module`` to the device and dtype of ``ref``
    (and every other buffer to its device). Metadata checks only: no host sync."""
    for name, buf in module.named_buffers(recurse=False):
        dtype = ref.dtype if name in names else buf.dtype
        if buf.device != ref.device or buf.dtype != dtype:
            setattr(module, name, buf.to(device=ref.device, dtype=dtype))


class GECO(nn.Module):
    r"""Generalized ELBO with Constrained Optimization (Rezende & Viola, 2018).

    Minimises the KL subject to a reconstruction constraint, through the
    Lagrangian of "Taming VAEs" (Rezende & Viola, 2018, Algorithm 1):

    .. math::
        C_t = \frac1B\sum_b \text{rec}_b - \kappa, \qquad
        \mathcal{L}_t = \frac1B\sum_b \text{kl}_b + \lambda_{t-1}\, C_t

    The multiplier is updated multiplicatively from a moving average of the
    constraint (initialised with the first :math:`C_t`):

    .. math::
        \bar C_t = \alpha\,\bar C_{t-1} + (1-\alpha)\,C_t, \qquad
        \lambda_t = \operatorname{clamp}\!\left(\lambda_{t-1}\,
        e^{\nu\,\bar C_t},\ \lambda_{\min},\ \lambda_{\max}\right)

    with :math:`\nu` = ``step_size``. While the reconstruction error is above
    ``kappa`` (:math:`\bar C > 0`) λ grows and the objective leans towards
    reconstruction; below it, λ shrinks and the KL is squeezed. λ plays the role
    of 1/β: the gradient of :math:`\mathcal{L}` is that of :math:`\lambda\cdot`
    ``vae_loss(beta=1/λ)``.

    The gradient reaches the model through the batch constraint :math:`C_t`, with
    λ a constant: :math:`\partial\mathcal{L}/\partial\,\text{rec}_b = \lambda/B`,
    :math:`\partial\mathcal{L}/\partial\,\text{kl}_b = 1/B`. The paper writes the
    constraint term as :math:`\lambda\,(C_t + \operatorname{sg}(\bar C_t - C_t))`
    (sg: stop-gradient), which has the same gradient and only reports
    :math:`\bar C_t` in the loss value; here the value is the batch's own
    Lagrangian.

    Args:
        kappa (float): κ, the tolerated reconstruction error, in the units of
            ``rec``: nats per sample, summed over the sample's elements (as
            :func:`fusedvae.vae_loss` returns it). For a Gaussian decoder with σ = 1
            and a per-element tolerance ε on the error, κ = N·(ε²/2 + ½·log 2π).
        alpha (float, optional): α, the moving-average rate, in ``[0, 1)``.
            Default: ``0.99`` (the paper's value: a time constant of ~100 steps).
        step_size (float, optional): ν (> 0). λ changes by a factor
            :math:`e^{\nu\bar C}` per step, so ν should be about 0.01/|C| for the
            violations |C| (in nats) you expect. Default: ``1e-3``: a 1 % change per
            step for a 10-nat violation, slower than the ~100-step moving average
            it follows, so λ does not oscillate; the paper's ``2e-2``-like values
            are for constraints measured per pixel, not summed.
        lambda_init (float, optional): λ before the first step. Default: ``1.0``,
            as in the paper: the first steps then follow the plain ELBO (β = 1).
        lambda_min (float, optional): lower clamp of λ (> 0). Default: ``1e-6``: a
            multiplicative update cannot leave 0, and from ``1e-6`` λ recovers in
            ln(1e6)/(ν·C) ≈ 1400 steps at a 1 % rate.
        lambda_max (float, optional): upper clamp of λ. Default: ``1e6``: gradients
            scaled by λ stay far from float32 overflow.

    Attributes:
        lambda_ (Tensor): λ, a 0-d buffer (the value the next :meth:`loss` uses).
        constraint_ma (Tensor): :math:`\bar C`, a 0-d buffer.
        num_updates (Tensor): updates so far, a 0-d int64 buffer.

    The state is updated only in training mode (``geco.train()``, the default), as
    batch norm's running statistics: in ``geco.eval()`` :meth:`loss` returns the
    objective and leaves λ alone.

    Example::

        >>> geco = fusedvae.controllers.GECO(kappa=80.0).to("cuda")
        >>> out = fusedvae.vae_loss(recon, images, mu, logvar)  # any beta: only rec, kl are used
        >>> geco.loss(out).backward()
    """

    lambda_: Tensor
    constraint_ma: Tensor
    num_updates: Tensor

    def __init__(
        self,
        kappa: float,
        alpha: float = 0.99,
        step_size: float = 1e-3,
        lambda_init: float = 1.0,
        lambda_min: float = 1e-6,
        lambda_max: float = 1e6,
    ) -> None:
        super().__init__()
        self.kappa = _args.check_finite(kappa, "kappa")
        alpha = _args.check_finite(alpha, "alpha")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must satisfy 0 <= alpha < 1, got {alpha!r}")
        self.alpha = alpha
        self.step_size = _args.check_positive(step_size, "step_size")
        self.lambda_min = _args.check_positive(lambda_min, "lambda_min")
        self.lambda_max = _args.check_positive(lambda_max, "lambda_max")
        if self.lambda_max < self.lambda_min:
            raise ValueError(f"lambda_max must be >= lambda_min ({lambda_min}), got {lambda_max!r}")
        lambda_init = _args.check_positive(lambda_init, "lambda_init")
        if not self.lambda_min <= lambda_init <= self.lambda_max:
            raise ValueError(
                f"lambda_init must lie in [lambda_min, lambda_max] = [{lambda_min}, {lambda_max}], got {lambda_init!r}"
            )
        self.register_buffer("lambda_", torch.tensor(lambda_init))
        self.register_buffer("constraint_ma", torch.tensor(0.0))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))

    def loss(self, out: VAELossOutput) -> Tensor:
        r"""The GECO objective :math:`\text{mean}_b\,\text{kl}_b + \lambda\,(\text{mean}_b\,\text{rec}_b - \kappa)`.

        Uses the current λ, then (in training mode) updates the moving average
        and λ in place, under :func:`torch.no_grad`.

        Args:
            out (VAELossOutput): the output of :func:`fusedvae.vae_loss`; only the
                per-sample ``rec`` and ``kl`` are used, so call it with any ``beta``.

        Returns:
            Tensor: a 0-d tensor, differentiable through ``rec`` and ``kl``.
        """
        rec, kl = _args.rec_kl(out)
        _follow(self, ("lambda_", "constraint_ma"), rec)
        constraint = rec.mean() - self.kappa
        # λ is updated in place below; the objective keeps this step's value.
        lam = self.lambda_.detach().clone()
        objective = kl.mean() + lam * constraint
        if self.training:
            with torch.no_grad():
                c_t = constraint.detach()
                moving = self.alpha * self.constraint_ma + (1.0 - self.alpha) * c_t
                moving = torch.where(self.num_updates > 0, moving, c_t)
                self.constraint_ma.copy_(moving)
                lam_new = self.lambda_ * torch.exp(self.step_size * moving)
                self.lambda_.copy_(torch.clamp(lam_new, self.lambda_min, self.lambda_max))
                self.num_updates.add_(1)
        return objective

    def forward(self, out: VAELossOutput) -> Tensor:
        """Same as :meth:`loss`."""
        return self.loss(out)

    def extra_repr(self) -> str:
        return (
            f"kappa={self.kappa}, alpha={self.alpha}, step_size={self.step_size}, "
            f"lambda_min={self.lambda_min}, lambda_max={self.lambda_max}"
        )


class ControlVAE(nn.Module):
    r"""The PI controller of ControlVAE (Shao et al., 2020): β steers the KL to a target.

    With the error :math:`e(t) = v_{KL} - \widehat{KL}(t)` between the target KL and
    the batch KL (:math:`\widehat{KL}(t)` = ``kl.mean()``, detached), the PI law of
    Shao et al. (2020), "ControlVAE: Controllable Variational Autoencoder", is

    .. math::
        \beta(t) = \frac{K_p}{1 + \exp(e(t))} - K_i \sum_{j=0}^{t} e(j) + \beta_{\min},

    computed as in their Algorithm 1 with an integral term and saturation:

    .. math::
        P(t) = \frac{K_p}{1 + e^{e(t)}}, \qquad I(t) = I(t-1) - K_i\,e(t), \qquad
        \beta(t) = \operatorname{clamp}\left(P(t) + I(t) + \beta_{\min},\
        \beta_{\min},\ \beta_{\max}\right).

    A KL below the target (:math:`e > 0`) lowers β, which lets the KL grow; above
    it, β rises. :math:`P \in (0, K_p)` reacts at once; :math:`I` removes the
    steady-state error.

    Anti-windup (a clamped integrator): the integral never winds past a bound it
    is pushing against. Let :math:`I^{\max}(t) = \beta_{\max} - \beta_{\min} - P(t)` and
    :math:`I^{\min}(t) = -P(t)` be the integrals that put the unclamped β exactly on
    :math:`\beta_{\max}` and :math:`\beta_{\min}`. A step that raises :math:`I` stops
    at :math:`I^{\max}(t)` (and is skipped, :math:`I(t) = I(t-1)`, when :math:`I(t-1)`
    is already above it); a step that lowers :math:`I` stops at :math:`I^{\min}(t)`
    likewise; a step back towards the interval is always taken in full. So β
    reaches a bound exactly, and after a long saturation it leaves the bound as
    soon as the error changes sign, instead of first unwinding an integral that
    kept growing. Algorithm 1 of the paper skips the step when β(t−1) lies
    outside the bounds: for the clamped β that never happens, and for the
    unclamped β (which the authors' code keeps) it freezes the integral for good
    once :math:`I` alone has carried β past a bound (:math:`P < K_p` cannot bring
    it back). The clamped integrator does neither.

    Args:
        kl_target (float): :math:`v_{KL}`, the KL to reach, in nats per sample (>= 0).
        Kp (float, optional): :math:`K_p` (>= 0). Default: ``0.01``.
        Ki (float, optional): :math:`K_i` (>= 0). Default: ``0.0001``. (Both are the
            paper's values.)
        beta_min (float, optional): :math:`\beta_{\min}` (>= 0). Default: ``0.0``.
        beta_max (float, optional): :math:`\beta_{\max}` (>= ``beta_min``). Default: ``1.0``.

    Attributes:
        beta (Tensor): β, a 0-d buffer updated in place by :meth:`update`; starts at
            ``beta_min`` (the paper's β(0) = 0 for β_min = 0).
        integral (Tensor): :math:`I`, a 0-d buffer; starts at 0.

    Example::

        >>> ctrl = fusedvae.controllers.ControlVAE(kl_target=25.0)
        >>> out = fusedvae.vae_loss(recon, images, mu, logvar, beta=0.0)
        >>> beta = ctrl.update(out.kl)                 # β(t) from this batch's KL
        >>> loss = out.rec.mean() + beta * out.kl.mean()

    or, one step behind as is common, ``vae_loss(..., beta=ctrl.beta)`` followed by
    ``ctrl.update(out.kl)`` after ``backward()`` (the buffer is written in place, and
    autograd rejects an in-place write to a tensor it saved before ``backward()``).
    """

    beta: Tensor
    integral: Tensor

    def __init__(
        self,
        kl_target: float,
        Kp: float = 0.01,  # noqa: N803 (the paper's names)
        Ki: float = 0.0001,  # noqa: N803
        beta_min: float = 0.0,
        beta_max: float = 1.0,
    ) -> None:
        super().__init__()
        self.kl_target = _args.check_nonnegative(kl_target, "kl_target")
        self.Kp = _args.check_nonnegative(Kp, "Kp")
        self.Ki = _args.check_nonnegative(Ki, "Ki")
        self.beta_min = _args.check_nonnegative(beta_min, "beta_min")
        self.beta_max = _args.check_finite(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min ({beta_min}), got {beta_max!r}")
        self.register_buffer("beta", torch.tensor(self.beta_min))
        self.register_buffer("integral", torch.tensor(0.0))

    def update(self, kl: Union[Tensor, float]) -> Tensor:
        r"""Take one controller step from the KL of a batch and return β(t).

        Args:
            kl (Tensor or float): the per-sample KL ``[B]`` of
                :class:`fusedvae.VAELossOutput` (or any tensor whose mean is the batch
                KL, or a float); it is detached.

        Returns:
            Tensor: β(t), a new 0-d tensor (``self.beta`` holds the same value), which
            can be passed as ``beta`` to :func:`fusedvae.vae_loss`.
        """
        if isinstance(kl, Tensor):
            if not kl.dtype.is_floating_point:
                raise TypeError(f"kl must be a floating-point tensor, got dtype {kl.dtype}")
            kl_t = kl.detach().mean()
        elif _args.is_real(kl):
            kl_t = torch.tensor(float(kl), dtype=self.beta.dtype, device=self.beta.device)
        else:
            raise TypeError(f"kl must be a tensor or a float, got {type(kl).__name__}")
        _follow(self, ("beta", "integral"), kl_t)
        with torch.no_grad():
            error = self.kl_target - kl_t
            p = self.Kp * torch.sigmoid(-error)  # Kp / (1 + exp(e)), without overflow
            step = -self.Ki * error
            previous = self.integral
            integral = previous + step
            # Anti-windup: an outward step stops where β meets the bound, never moves I back.
            at_max = (self.beta_max - self.beta_min) - p
            at_min = -p
            integral = torch.where(step > 0, torch.maximum(previous, torch.minimum(integral, at_max)), integral)
            integral = torch.where(step < 0, torch.minimum(previous, torch.maximum(integral, at_min)), integral)
            beta = torch.clamp(p + integral + self.beta_min, self.beta_min, self.beta_max)
            self.integral.copy_(integral)
            self.beta.copy_(beta)
        return beta

    def forward(self, kl: Union[Tensor, float]) -> Tensor:
        """Same as :meth:`update`."""
        return self.update(kl)

    def extra_repr(self) -> str:
        return (
            f"kl_target={self.kl_target}, Kp={self.Kp}, Ki={self.Ki}, "
            f"beta_min={self.beta_min}, beta_max={self.beta_max}"
        )

