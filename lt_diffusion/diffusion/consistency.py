"""Consistency models (Song et al., "Consistency Models", ICML 2023) on this framework's VP
diffusion: the consistency function, the distillation grid and the 1- / multi-step sampler.

The framework's backbones are VP DDPMs on the discrete ``t`` of the schedule. A VP sample
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` is the VE variable ``x = x_t / sqrt(abar_t)
= x_0 + sigma_t eps`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the paper's formulas are
written in that variable, with ``sigma_min = sigma_0`` (the schedule's smallest noise level,
about 0.01 for Ho et al.'s linear betas; the paper's epsilon is 0.002) and
``sigma_max = sigma_{T-1}``.

The consistency function (Song et al., eq. 5 and App. C)::

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma)
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
    c_out  = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)

so ``f(x, sigma_min) = x`` exactly. ``F`` is the backbone: the paper initialises it from EDM's
network ``F``, whose denoiser is ``D = c_skip^EDM x + c_out^EDM F`` (Karras et al. 2022,
Table 1: ``c_skip^EDM = sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out^EDM = sigma
sigma_data / sqrt(sigma^2 + sigma_data^2)``). Our backbones predict ``eps`` from
``(x_t, t, y)``, whose denoiser is ``D = x - sigma eps``; so ``F`` is that same denoiser in
EDM's output scaling (:func:`preconditioned_output`), and a student initialised from the
teacher starts with ``f`` equal to the teacher's denoiser up to the ``sigma_min`` shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from lt_diffusion.diffusion.samplers import Generator, Sampler, _randn_like
from lt_diffusion.diffusion.schedule import NoiseSchedule

SIGMA_DATA = 0.5  # Song et al., App. C (and EDM): the data's standard deviation, images in [-1, 1]

Scalar = float | Tensor


def vp_sigmas(schedule: NoiseSchedule) -> Tensor:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` of every discrete ``t``, float64 (T,)."""
    abar = schedule.host64("alphas_cumprod")
    return ((1.0 - abar) / abar).sqrt()


def consistency_scalings(
    sigma: Scalar, sigma_min: Scalar, sigma_data: float = SIGMA_DATA
) -> tuple[Scalar, Scalar]:
    """Song et al., App. C: ``(c_skip, c_out)`` at noise level ``sigma`` (floats or tensors).

    ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0`` exactly (the boundary condition).
    """
    d2 = sigma_data**2
    c_skip = d2 / ((sigma - sigma_min) ** 2 + d2)
    c_out = sigma_data * (sigma - sigma_min) / (d2 + sigma**2) ** 0.5
    return c_skip, c_out


def preconditioned_output(
    x: Tensor, sigma: Scalar, out: Tensor, sigma_data: float = SIGMA_DATA
) -> Tensor:
    """EDM's ``F = (D - c_skip^EDM x) / c_out^EDM`` for the eps-parameterised denoiser
    ``D = x - sigma out`` of a backbone output ``out`` at the VE point ``x``.

    Written out (no division by ``sigma``): ``F = (sigma x / s - s out) / sigma_data`` with
    ``s = sqrt(sigma^2 + sigma_data^2)``.
    """
    s = (sigma**2 + sigma_data**2) ** 0.5
    return (sigma / s * x - s * out) / sigma_data


def consistency_fn(
    x: Tensor, sigma: Scalar, sigma_min: Scalar, out: Tensor, sigma_data: float = SIGMA_DATA
) -> Tensor:
    """``f(x, sigma) = c_skip x + c_out F`` (Song et al., eq. 5 / App. C) from the backbone's
    output ``out`` at the VE point ``x`` (``F``: :func:`preconditioned_output`)."""
    c_skip, c_out = consistency_scalings(sigma, sigma_min, sigma_data)
    return c_skip * x + c_out * preconditioned_output(x, sigma, out, sigma_data)


def consistency_fn_vp(x_t: Tensor, t: Tensor, out: Tensor, sigmas: Tensor) -> Tensor:
    """:func:`consistency_fn` at VP samples ``x_t`` (B, ...) of timesteps ``t`` (B,), with the
    schedule's ``sigmas`` (:func:`vp_sigmas`, on ``x_t``'s device): ``x = x_t sqrt(1 + sigma^2)``
    (``1 / sqrt(abar) = sqrt(1 + sigma^2)``), ``sigma_min = sigmas[0]``."""
    sigma = sigmas[t].reshape(-1, *([1] * (x_t.ndim - 1)))
    x = x_t * (1.0 + sigma**2).sqrt()
    return consistency_fn(x, sigma, sigmas[0], out)


def karras_timesteps(schedule: NoiseSchedule, num_scales: int, rho: float = 7.0) -> list[int]:
    """The distillation grid: Karras et al.'s ``N`` noise levels between ``sigma_min`` and
    ``sigma_max`` (Song et al., Sec. 5: ``sigma_i = (sigma_min^(1/rho) + (i - 1) / (N - 1)
    (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``), each moved to the training timestep
    nearest in ``log sigma``, so that the teacher is only asked about the ``t`` it was trained
    on. Ascending, from 0 to T - 1, all distinct."""
    if isinstance(num_scales, bool) or int(num_scales) != num_scales or num_scales < 2:
        raise ValueError(f"method.objective.num_scales must be an integer >= 2, got {num_scales!r}")
    log_sigma = vp_sigmas(schedule).log().numpy()
    lo, hi = np.exp(log_sigma[0] / rho), np.exp(log_sigma[-1] / rho)
    wanted = np.log((lo + np.arange(num_scales) / (num_scales - 1) * (hi - lo)) ** rho)
    ts = [int(np.abs(log_sigma - w).argmin()) for w in wanted]
    if len(set(ts)) != len(ts):
        raise ValueError(
            f"method.objective.num_scales={num_scales} (rho={rho}) puts two noise levels on the "
            f"same training timestep ({ts}): lower num_scales (the paper uses 18 on CIFAR-10, 40 "
            "on ImageNet-64)"
        )
    return ts


class ConsistencySampler(Sampler):
    """Multistep consistency sampling (Song et al., Algorithm 1), in VP variables.

    With the visited timesteps ``tau_1 = T - 1 > tau_2 > ...``: ``x = f(x_T, sigma_max)``;
    then for each later ``tau``: ``x_tau = x + sqrt(sigma_tau^2 - sigma_min^2) z`` and
    ``x = f(x_tau, sigma_tau)``. The VP state is ``x_tau sqrt(abar_tau)``, so the initial VP
    noise ``x_T ~ N(0, I)`` is the VE point ``sqrt(1 + sigma_max^2) z`` (the forward marginal
    the teacher was trained on; the paper's ``sigma_max z`` differs by a factor
    ``sqrt(1 + 1/sigma_max^2)``, 1 + 2e-5 here).

    Args:
        schedule: the noise schedule of the teacher and student.
        steps: the number of steps (network evaluations).
        timesteps: the visited timesteps, ``steps`` of them, strictly descending from ``T - 1``;
            null for one step (``[T - 1]``). More steps need them (the paper searches the
            intermediate times per model).
        clip_denoised: clip every ``f`` to ``[-1, 1]`` (before it is noised again).
    """

    name = "consistency"
    model_output = "consistency"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int = 1,
        timesteps: Sequence[int] | None = None,
        clip_denoised: bool = True,
    ) -> None:
        super().__init__(schedule)
        if timesteps is None:
            if steps != 1:
                raise ValueError(
                    f"sampler.sampler.steps={steps} needs sampler.sampler.timesteps (the "
                    f"{steps} timesteps to visit, from {schedule.T - 1} down), or steps=1"
                )
            timesteps = [schedule.T - 1]
        ts = [int(t) for t in timesteps]
        if len(ts) != steps:
            raise ValueError(
                f"sampler.sampler.timesteps={ts} has {len(ts)} entries, sampler.sampler.steps is "
                f"{steps}: give one timestep per step"
            )
        if ts[0] != schedule.T - 1 or ts[-1] < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(
                f"sampler.sampler.timesteps must descend strictly from T - 1 = {schedule.T - 1}"
                f" (the first step starts from pure noise) and stay >= 0, got {ts}"
            )
        self._ts = ts
        self.clip_denoised = bool(clip_denoised)

    @property
    def timesteps(self) -> list[int]:
        return list(self._ts)

    def begin(self) -> dict[str, Any]:
        sig = vp_sigmas(self.schedule).tolist()  # host float64: no device sync in the loop
        return {"sigma": [sig[t] for t in self._ts], "sigma_min": sig[0]}

    def update(
        self, state: dict[str, Any], i: int, x: Tensor, t: Tensor, eps: Tensor, gen: Generator
    ) -> Tensor:
        sigma, sigma_min = state["sigma"][i], state["sigma_min"]
        f = consistency_fn(x * math.sqrt(1.0 + sigma**2), sigma, sigma_min, eps.to(x.dtype))
        if self.clip_denoised:
            f = f.clamp(-1.0, 1.0)
        if i == len(self._ts) - 1:
            return f
        nxt = state["sigma"][i + 1]
        x_next = f + math.sqrt(nxt**2 - sigma_min**2) * _randn_like(x, gen)
        return x_next / math.sqrt(1.0 + nxt**2)  # back to the VP state
