"""DDPM baseline (Ho et al. 2020): ``L = ||eps - eps_theta(x_t, t, y)||^2``."""

from __future__ import annotations

from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, Result, Step


class DDPMObjective(Objective):
    """Epsilon-prediction MSE, averaged over pixels and batch, with CFG label dropout."""

    name = "ddpm"

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        return s.plain("mse")
