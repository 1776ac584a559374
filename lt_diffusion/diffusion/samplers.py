"""Reverse-process samplers: DDPM ancestral sampling and DDIM, with classifier-free guidance.

Model convention: ``model(x_t, t, y) -> eps`` with ``t`` int64 ``(B,)`` in ``[0, T)`` and ``y``
int64 ``(B,)``; the unconditional model is the same network called with
``y = model.null_label``.

Guidance follows CBDM / CM: ``eps = eps_c + w (eps_c - eps_u)``, so ``w = 0`` is the purely
conditional model (``w = -1`` the unconditional one).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lt_diffusion.diffusion.schedule import NoiseSchedule

DDPM_VARIANCES = ("fixed_large", "fixed_small")
DDIM_SPACINGS = ("uniform", "linspace", "trailing")

Model = Callable[..., Tensor]
Generator = torch.Generator | None


def guided_eps(model: Model, x: Tensor, t: Tensor, y: Tensor, guidance: float) -> Tensor:
    """Classifier-free-guided noise prediction ``eps_c + w (eps_c - eps_u)``.

    The conditional and unconditional predictions come from ONE forward pass on the batch
    concatenated with itself (second half labelled ``model.null_label``): one batched call
    instead of two. ``w == 0`` makes a single, purely conditional call. The result has ``x``'s dtype (autocast outputs are upcast).
    """
    if guidance == 0.0:
        eps = model(x, t, y)
        _check_eps(eps, x)
        return eps.to(x.dtype)
    null = getattr(model, "null_label", None)
    if null is None:
        raise AttributeError(
            "classifier-free guidance needs model.null_label (the unconditional class index); "
            "this model has none: sample with guidance=0 or use a model trained with label dropout"
        )
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    _check_eps(out, torch.cat([x, x]))
    eps_c, eps_u = out.to(x.dtype).chunk(2)
    return eps_c + guidance * (eps_c - eps_u)


def _check_eps(eps: Tensor, x: Tensor) -> None:
    if eps.shape != x.shape:
        raise ValueError(
            f"model returned shape {tuple(eps.shape)} for input {tuple(x.shape)}: samplers need "
            "an epsilon-prediction network whose output has the input's shape"
        )


def _progress(steps: Iterable[int], enabled: bool, desc: str, total: int) -> Iterable[int]:
    """Wrap ``steps`` in a tqdm bar when asked (iterating Python ints: no device sync)."""
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class Sampler(ABC):
    """Turns initial noise ``x_T`` and labels into images ``x_0`` in ``[-1, 1]``."""

    name: str = "sampler"
    # What the network's output means to the sampler: a noise prediction, or the backbone
    # output of a consistency model (lt_diffusion.diffusion.consistency).
    model_output: str = "eps"

    def __init__(self, schedule: NoiseSchedule) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule must be a NoiseSchedule, got {type(schedule).__name__}: build the "
                "sampler as instantiate(cfg.sampler.sampler)(schedule=schedule)"
            )
        self.schedule = schedule

    @property
    @abstractmethod
    def timesteps(self) -> list[int]:
        """The visited timesteps, in the order they are visited (descending)."""

    @property
    def num_steps(self) -> int:
        """Number of network evaluations per image (before guidance doubling)."""
        return len(self.timesteps)

    @torch.inference_mode()
    def sample(
        self,
        model: Model,
        noise: Tensor,
        labels: Tensor,
        guidance: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        clamp: bool = True,
    ) -> Tensor:
        """Run the reverse process from ``noise`` (x_T) with class ``labels``: one guided noise
        prediction per visited timestep, then the sampler's :meth:`update`.

        Args:
            model: ``model(x_t, t, y) -> eps``.
            noise: initial x_T, shape ``(B, ...)``; the images are sampled on its device.
            labels: int64 ``(B,)`` class labels.
            guidance: classifier-free guidance weight ``w``.
            generator: source of the per-step noise; must live on ``noise``'s device.
            progress: show a per-step progress bar.
            clamp: clamp x_0 to ``[-1, 1]`` (latents are not bounded: False).

        Returns:
            x_0, same shape and dtype as ``noise``.
        """
        labels = self._prepare(noise, labels, guidance, generator)
        x, ts = noise, self.timesteps
        state = self.begin()
        for i in _progress(range(len(ts)), progress, f"{self.name.upper()}{len(ts)}", len(ts)):
            t = torch.full((x.shape[0],), ts[i], device=x.device, dtype=torch.long)
            x = self.update(state, i, x, t, guided_eps(model, x, t, labels, guidance), generator)
        return x.clamp(-1.0, 1.0) if clamp else x

    def begin(self) -> dict[str, Any]:
        """Per-run values the updates share (host scalars, history); computed once per call."""
        return {}

    @abstractmethod
    def update(
        self, state: dict[str, Any], i: int, x: Tensor, t: Tensor, eps: Tensor, gen: Generator
    ) -> Tensor:
        """Step ``i`` (at timestep ``t``, the network's guided ``eps``): ``x`` one step on."""

    def _prepare(
        self, noise: Tensor, labels: Tensor, guidance: float, generator: torch.Generator | None
    ) -> Tensor:
        """Validate the inputs (host-side checks only) and return labels on noise's device."""
        if noise.ndim < 2:
            raise ValueError(f"noise must have shape (B, ...), got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a float tensor, got {noise.dtype}")
        if labels.ndim != 1 or labels.shape[0] != noise.shape[0]:
            raise ValueError(
                f"labels must have shape ({noise.shape[0]},) to match noise, got "
                f"{tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        if generator is not None and generator.device.type != noise.device.type:
            raise ValueError(
                f"generator lives on {generator.device} but noise on {noise.device}: create "
                "torch.Generator(device=noise.device)"
            )
        return labels.to(device=noise.device, dtype=torch.long)


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020): ``x_{t-1} = mu_theta(x_t, t) + sigma_t z``.

    All T steps are taken; no noise is added at the last step (t = 0).

    Args:
        schedule: the noise schedule the model was trained with.
        variance: ``"fixed_large"``: ``sigma_t^2 = beta_t``, except at the first timestep
            (index 0, the paper's t = 1) where Ho et al.'s code uses the posterior variance
            (their log-variance array is ``log([beta_tilde_1, beta_1, ..., beta_{T-1}])``, in
            0-based indices); ``"fixed_small"``: the posterior variance ``beta_tilde_t``, its
            zero at index 0 clipped to ``beta_tilde_1``. Index 0 is the noise-free last step,
            so its entry only matters for likelihoods, not for samples.
        clip_denoised: clip the predicted x0 to ``[-1, 1]`` before the posterior mean.
    """

    name = "ddpm"

    def __init__(
        self, schedule: NoiseSchedule, variance: str = "fixed_large", clip_denoised: bool = True
    ) -> None:
        super().__init__(schedule)
        if variance not in DDPM_VARIANCES:
            raise ValueError(
                f"Unknown DDPM variance {variance!r}: use one of {DDPM_VARIANCES} "
                "(sampler.sampler.variance)"
            )
        self.variance = variance
        self.clip_denoised = bool(clip_denoised)

    @property
    def timesteps(self) -> list[int]:
        return list(range(self.schedule.T - 1, -1, -1))

    def sigmas(self) -> list[float]:
        """Per-timestep standard deviation ``sigma_t`` of the added noise (float64, host)."""
        post_var = self.schedule.host64("posterior_variance")
        if self.variance == "fixed_large":
            var = torch.cat([post_var[1:2], self.schedule.host64("betas")[1:]])
        else:
            var = torch.cat([post_var[1:2], post_var[1:]])
        return var.sqrt().tolist()

    def begin(self) -> dict[str, Any]:
        return {"sigmas": self.sigmas()}

    def update(
        self, state: dict[str, Any], i: int, x: Tensor, t: Tensor, eps: Tensor, gen: Generator
    ) -> Tensor:
        step = self.schedule.T - 1 - i
        mean = self.schedule.reverse_mean(x, t, eps, self.clip_denoised).to(x.dtype)
        return mean + state["sigmas"][step] * _randn_like(x, gen) if step > 0 else mean


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The ``steps`` timesteps DDIM visits, ascending, all distinct and in ``[0, T)``.

    * ``"uniform"``: Song et al.'s uniform skip ``range(0, T, T // steps)`` when ``T`` divides
      by ``steps`` (diffusers' "leading"); otherwise, to keep exactly ``steps`` steps, the
      rounded ``linspace(0, T - T/steps, steps)``, i.e. ``round(k T / steps)``.
    * ``"linspace"``: ``round(linspace(0, T - 1, steps))`` (first and last timestep included).
    * ``"trailing"``: ``round(T - k T / steps) - 1`` for ``k = 0 .. steps-1`` (ends at T - 1;
      Lin et al. 2024).
    """
    T = num_timesteps
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= T:
        raise ValueError(
            f"DDIM steps must be an integer in [1, T={T}], got {steps!r}: lower "
            "sampler.sampler.steps"
        )
    steps = int(steps)
    if spacing == "uniform":
        if T % steps == 0:
            ts = np.arange(0, T, T // steps)
        else:
            ts = np.round(np.arange(steps) * (T / steps))
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, steps))
    elif spacing == "trailing":
        ts = np.round(T - np.arange(steps) * (T / steps)) - 1
    else:
        raise ValueError(
            f"Unknown DDIM spacing {spacing!r}: use one of {DDIM_SPACINGS} "
            "(sampler.sampler.spacing)"
        )
    out = sorted(int(v) for v in ts)
    # Spacing >= 1 between the real-valued points keeps the rounded ones distinct.
    assert len(set(out)) == steps and out[0] >= 0 and out[-1] < T, out
    return out


class SubsequenceSampler(Sampler):
    """A sampler that visits ``steps`` of the training timesteps (:func:`ddim_timesteps` with
    ``spacing``) and may clip its x0 predictions to ``[-1, 1]`` (``clip_denoised``)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        spacing: str = "uniform",
        clip_denoised: bool = False,
    ) -> None:
        super().__init__(schedule)
        self.spacing = spacing
        self.clip_denoised = bool(clip_denoised)
        self._ts = ddim_timesteps(schedule.T, steps, spacing)

    @property
    def timesteps(self) -> list[int]:
        """The visited timesteps in the order they are visited (descending, like diffusers)."""
        return self._ts[::-1]


class DDIMSampler(SubsequenceSampler):
    """DDIM (Song et al. 2021) on a subsequence of the training timesteps.

    Per step from ``t`` to the previous visited timestep (``abar_prev = 1`` after the last):
    ``x0 = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)``,
    ``sigma = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1 - abar_t/abar_prev)``,
    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``.
    ``eta = 0`` is the deterministic sampler, ``eta = 1`` matches DDPM's posterior variance.

    Args:
        schedule: the noise schedule the model was trained with.
        steps: number of sampling steps S (1 <= S <= T).
        eta: stochasticity in ``[0, 1]``.
        spacing: ``"uniform"``, ``"linspace"`` or ``"trailing"``; see :func:`ddim_timesteps`.
        clip_denoised: clip the predicted x0 to ``[-1, 1]`` at every step (off in Song et al.);
            the eps direction term keeps the network's eps, as diffusers does.
    """

    name = "ddim"

    def __init__(
        self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, **subsequence: Any
    ) -> None:
        super().__init__(schedule, steps, **subsequence)
        # eta > 1 can make 1 - abar_prev - sigma^2 negative (no real update): refuse it.
        if not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"DDIM eta must be in [0, 1], got {eta} (0: deterministic, 1: DDPM-like noise)"
            )
        self.eta = float(eta)

    def _update(
        self, x: Tensor, eps: Tensor, a_t: float, a_prev: float, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One DDIM step with host-float ``abar`` values; returns ``(x_prev, x0_pred)``."""
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        sigma = self.eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        # max(0, .) guards the float rounding of 1 - abar_prev - sigma^2 (>= 0 for eta <= 1).
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0.0:
            if noise is None:
                raise ValueError(f"eta={self.eta} > 0 needs noise for this step")
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    def step(
        self, x_t: Tensor, eps: Tensor, t: int, t_prev: int, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One DDIM update from timestep ``t`` to ``t_prev`` (``-1``: to the data, abar = 1).

        Returns ``(x_prev, x0_pred)``. ``noise`` is the ``z`` of the update (needed when
        ``eta > 0``).
        """
        if not -1 <= t_prev < t < self.schedule.T:
            raise ValueError(f"need -1 <= t_prev < t < T, got t={t}, t_prev={t_prev}")
        abar = self.schedule.host64("alphas_cumprod")
        a_prev = 1.0 if t_prev < 0 else float(abar[t_prev])
        return self._update(x_t, eps, float(abar[t]), a_prev, noise)

    def begin(self) -> dict[str, Any]:
        # Host float64 scalars: the loop never syncs, and 1 - abar keeps its digits near t = 0.
        abar = self.schedule.host64("alphas_cumprod").tolist()
        return {"abar": [abar[t] for t in self.timesteps] + [1.0]}  # abar_prev = 1 at the end

    def update(
        self, state: dict[str, Any], i: int, x: Tensor, t: Tensor, eps: Tensor, gen: Generator
    ) -> Tensor:
        last = i == len(self._ts) - 1
        z = _randn_like(x, gen) if self.eta > 0.0 and not last else None
        # After the last step abar_prev = 1, so x_prev is the x0 prediction itself.
        return self._update(x, eps, state["abar"][i], state["abar"][i + 1], z)[0]
