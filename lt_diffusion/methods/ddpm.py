"""DDPM baseline (Ho et al. 2020): ``L = ||eps - eps_theta(x_t, t, y)||^2``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import ObjectiveOutput, mse
from lt_diffusion.methods.common import BaseContext, ComposableObjective, call_model


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
        b = self.noised(x0, schedule)
        y_in, dropped = self.drop_condition(y, model.null_label)
        eps = call_model(model, b.x_t, b.t, y_in, aug_labels)
        loss = mse(eps, b.noise)
        ctx = BaseContext(b.x_t, b.t, b.noise, y_in, eps, dropped, b.noise, aug_labels)
        return ObjectiveOutput(loss, {"mse": loss.detach()}), ctx
