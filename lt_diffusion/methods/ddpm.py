"""DDPM baseline (Ho et al. 2020): ``L = ||eps - eps_theta(x_t, t, y)||^2``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import ObjectiveOutput
from lt_diffusion.methods.common import BaseContext, ComposableObjective


class DDPMObjective(ComposableObjective):
    """Epsilon-prediction MSE, averaged over pixels and batch, with CFG label dropout."""

    name = "ddpm"

    def compute(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        y: Tensor,
        schedule: NoiseSchedule,
        aug_labels: Tensor | None = None,
    ) -> tuple[ObjectiveOutput, BaseContext]:
        return self.begin(model, x0, schedule, y, aug_labels).plain("mse")
