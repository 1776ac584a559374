"""Overlap optimization (after Yan et al. 2024, "Diffusion models for long-tailed generation
via overlap optimization"; their repository has no training code, so the form below is ours).

The overlap of two classes' reverse processes at step ``t`` is measured by
``KL[p(x_{t-1} | x_t, c_i) || p(x_{t-1} | x_t, c_j)]``. Both are Gaussians with the same fixed
variance ``sigma_t^2`` and means ``mu(x_t, c) = (x_t - beta_t / sqrt(1 - abar_t) eps(x_t, c)) /
sqrt(alpha_t)``, so (Ho et al. 2020, eq. 8 with two model means)::

    KL = ||mu_i - mu_j||^2 / (2 sigma_t^2)
       = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps(x_t, c_i) - eps(x_t, c_j)||^2

We take ``sigma_t^2 = beta_t``, so ``w_t = beta_t / (2 alpha_t (1 - abar_t))``, normalised to
mean 1 over ``t = 0 .. T-1`` (so ``weight`` keeps its scale across schedules and ``T``). The
overlap is penalised contrastively with a hinge: for each sample of class ``y`` a negative
class ``y_neg`` is drawn uniformly from the *other* classes and::

    d_b = mean_pixels (eps(x_t, y) - eps(x_t, y_neg))^2
    L   = L_ddpm + weight * mean_b( w_t relu(margin - d_b) )

Gradients flow through both predictions (the KL depends on both classes' reverse processes);
``detach_negative`` stops the one through ``eps(x_t, y_neg)``. The term compares class
predictions, so it is skipped on batches whose condition was dropped for classifier-free
guidance; with per-sample dropout the null-label samples contribute 0 (the sum is still divided
by the batch size, as CBDM's regulariser does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, mse
from lt_diffusion.utils import draws


def overlap_timestep_weights(schedule: NoiseSchedule) -> Tensor:
    """``w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))`` with ``sigma_t^2 = beta_t``,
    divided by its mean over the ``T`` steps; shape (T,), the schedule buffers' dtype."""
    betas, alphas, abar = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    sigma2 = betas
    w = betas.pow(2) / (2.0 * sigma2 * alphas * (1.0 - abar))
    return w / w.mean()


def negative_labels(y: Tensor, num_classes: int) -> Tensor:
    """For each label a different class, uniform over the other ``num_classes - 1``:
    ``(y + k) mod C`` with ``k ~ U{1, ..., C-1}``."""
    if num_classes < 2:
        raise ValueError(f"overlap optimization needs at least 2 classes, got {num_classes}")
    k = draws.randint(1, num_classes, y.shape, y.device)
    return (y + k) % num_classes


class OverlapObjective(Objective):
    """DDPM loss plus the hinge on the reverse-process overlap with a negative class.

    Args:
        weight: weight of the overlap term (ours: 0.1).
        margin: the hinge margin on the per-pixel mean squared distance between the two
            predictions (ours: 0.1; predictions of unit-variance noise differ by O(0.1-1)).
        detach_negative: stop the gradient through ``eps(x_t, y_neg)`` (default: no).
        fused_forward: both predictions in one forward over the concatenated batch.
        dropout: CFG label dropout (``cond_drop_prob``, ``cond_drop_mode``), see :class:`Objective`.
    """

    name = "overlap"
    passes = 2  # eps at y and at another class

    def __init__(
        self,
        weight: float = 0.1,
        margin: float = 0.1,
        detach_negative: bool = False,
        fused_forward: bool = True,
        **dropout: Any,
    ) -> None:
        super().__init__(**dropout)
        if weight < 0 or margin < 0:
            raise ValueError(f"weight and margin must be >= 0, got {weight}, {margin}")
        self.weight = float(weight)
        self.margin = float(margin)
        self.detach_negative = bool(detach_negative)
        self.fused_forward = bool(fused_forward)

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        if s.dropped or self.weight == 0.0:  # host-side decisions: no sync
            return s.plain("ddpm", "overlap")

        num_classes = int(getattr(s.model, "num_classes", self.class_counts.numel()))
        real = s.y_in != s.model.null_label
        y_neg = negative_labels(torch.where(real, s.y_in, torch.zeros_like(s.y_in)), num_classes)
        eps, eps_neg = s.predict_labels([s.y_in, y_neg], self.fused_forward)
        if self.detach_negative:
            eps_neg = eps_neg.detach()

        ddpm = mse(eps, s.noise)
        dtype = torch.promote_types(eps.dtype, torch.float32)
        d = (eps.to(dtype) - eps_neg.to(dtype)).pow(2).flatten(1).mean(1)
        w_t = overlap_timestep_weights(schedule)[s.t].to(dtype) * real.to(dtype)
        overlap = (w_t * torch.relu(self.margin - d)).mean()
        loss = ddpm + self.weight * overlap
        terms = {"ddpm": ddpm.detach(), "overlap": overlap.detach(), "neg_dist": d.mean().detach()}
        return ObjectiveOutput(loss, terms), s.context(eps)
