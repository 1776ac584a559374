"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), multistep, first or second order: the fast sampler of the CM paper's
Table G.10 (15 steps).

It integrates the diffusion ODE in ``lambda = log(alpha / sigma)`` (``alpha = sqrt(abar)``,
``sigma = sqrt(1 - abar)``) with the data prediction ``x0 = (x - sigma eps) / alpha``. From
timestep ``s`` to ``t`` with ``h = lambda_t - lambda_s``:

* first order (equal to deterministic DDIM):
  ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s``;
* second order, multistep (2M, midpoint form), with the previous step's ``x0_{s'}`` and
  ``r = (lambda_s - lambda_{s'}) / h``:
  ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (x0_s + (x0_s - x0_{s'}) / (2 r))``.

The first step has no history (first order), and the last one goes to the data (``abar = 1``,
``sigma = 0``), where the update reduces to ``x0``. This is diffusers'
``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, midpoint,
``final_sigmas_type="zero"``), which the tests compare against; scalars stay on the host, so
the loop never syncs with the device.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from lt_diffusion.diffusion.samplers import Generator, SubsequenceSampler
from lt_diffusion.diffusion.schedule import NoiseSchedule


class DPMSolverSampler(SubsequenceSampler):
    """DPM-Solver++ multistep of order 1 or 2 on ``steps`` timesteps (deterministic).

    Args:
        schedule: the noise schedule the model was trained with.
        steps: number of network evaluations (before guidance doubling).
        order: 2 (DPM-Solver++(2M), the default) or 1 (DDIM).
        spacing: the visited timesteps, as for DDIM (:func:`ddim_timesteps`); ``"trailing"``
            starts at ``T - 1``, the fully noised step.
        clip_denoised: clip every data prediction ``x0`` to ``[-1, 1]`` before it enters the
            update (DPM-Solver++ integrates in x0, so this is its natural thresholding; it
            equals diffusers' ``thresholding=True`` with ``sample_max_value=1``).
    """

    name = "dpm_solver"

    def __init__(
        self, schedule: NoiseSchedule, steps: int = 15, order: int = 2, **subsequence: Any
    ) -> None:
        super().__init__(schedule, steps, **{"spacing": "trailing", **subsequence})
        if order not in (1, 2):
            raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order!r}")
        self.order = int(order)

    def begin(self) -> dict[str, Any]:
        abar = self.schedule.host64("alphas_cumprod").tolist()
        alpha = [math.sqrt(abar[t]) for t in self.timesteps] + [1.0]
        sigma = [math.sqrt(1.0 - abar[t]) for t in self.timesteps] + [0.0]
        lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
        return {"alpha": alpha, "sigma": sigma, "lambda": lam, "x0_prev": None}

    def update(
        self, state: dict[str, Any], i: int, x: Tensor, t: Tensor, eps: Tensor, gen: Generator
    ) -> Tensor:
        alpha, sigma, lam = state["alpha"], state["sigma"], state["lambda"]
        x0 = (x - sigma[i] * eps) / alpha[i]
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if i == len(self._ts) - 1:  # to the data: sigma = 0, the update is x0 itself
            return x0
        h = lam[i + 1] - lam[i]
        d = x0
        if self.order == 2 and state["x0_prev"] is not None:
            r = (lam[i] - lam[i - 1]) / h
            d = x0 + (x0 - state["x0_prev"]) / (2.0 * r)
        state["x0_prev"] = x0
        return (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
