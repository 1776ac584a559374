"""CBDM, class-balancing diffusion models (Qin et al., CVPR 2023).

For every sample one target label ``y'`` is drawn from a target-label distribution; with
``h = eps_theta(x_t, t, y)``, ``h' = eps_theta(x_t, t, y')`` and ``w_t = tau * t / T``::

    L = L_ddpm + mean(w_t (h - sg(h'))^2) + gamma * mean(w_t (sg(h) - h')^2)

(``reg`` pulls the conditional prediction towards the one of a class-balanced label;
``commit`` pulls the other way, more weakly). The regulariser compares *conditional*
predictions, so it is skipped on a batch whose condition was dropped (batch-mode CFG dropout,
as the authors' code does). With per-sample dropout only the samples that kept their label
contribute; the sum is still divided by the batch size, so in expectation the regulariser has
the same scale as under batch-mode dropout (each sample regularises with probability
``1 - p_drop`` in both modes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, check_choice, mse
from lt_diffusion.methods.common import (
    TARGET_DISTS,
    draw_labels,
    label_distribution,
    timestep_weight,
)


class CBDMObjective(Objective):
    """DDPM loss plus CBDM's distribution-adjustment regulariser.

    Args:
        tau: scale of the timestep weight ``w_t = tau * t / T`` (CBDM README: 1.0).
        gamma: weight of the commitment term (CBDM code: 1/4).
        target_dist: distribution of ``y'``: ``"empirical"`` (training class frequency, the
            authors' code when training from scratch), ``"uniform"`` (their fine-tuning mode)
            or ``"inverse"`` (proportional to 1 / frequency, PD-CBDM).
        fused_forward: compute ``h`` and ``h'`` in one forward pass over the concatenated
            batch (faster on a GPU; numerically the same model, GroupNorm is per sample).
        dropout: CFG label dropout (``cond_drop_prob``, ``cond_drop_mode``), see :class:`Objective`.
    """

    name = "cbdm"
    passes = 2  # eps at y and at the drawn y'

    def __init__(
        self,
        tau: float = 1.0,
        gamma: float = 0.25,
        target_dist: str = "empirical",
        fused_forward: bool = True,
        **dropout: Any,
    ) -> None:
        super().__init__(**dropout)
        check_choice("target_dist", target_dist, TARGET_DISTS)
        if tau < 0 or gamma < 0:
            raise ValueError(f"tau and gamma must be >= 0, got tau={tau}, gamma={gamma}")
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.target_dist = target_dist
        self.fused_forward = bool(fused_forward)
        self.register_buffer("target_probs", torch.zeros(0), persistent=False)

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        super().setup(class_counts, seed)
        self.target_probs = label_distribution(self.class_counts, self.target_dist)

    def target_labels(self, n: int) -> Tensor:
        """``n`` target labels ``y'`` drawn from the target-label distribution."""
        if self.target_probs.numel() == 0:
            raise RuntimeError("objective.setup(class_counts) must be called before training")
        return draw_labels(self.target_probs, n)

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        if s.dropped:  # a host-side bool: no synchronisation
            return s.plain("ddpm", "reg", "commit")
        self.check_classes(s)
        y_bal = self.target_labels(y.shape[0])
        h, h_bal = s.predict_labels([s.y_in, y_bal], self.fused_forward)
        return self.regularised(s, h, h_bal, schedule)

    def check_classes(self, s: Step) -> None:
        """Refuse a model whose classes are not those the objective was set up with."""
        num_classes = getattr(s.model, "num_classes", None)
        if num_classes is not None and num_classes != self.target_probs.numel():
            raise ValueError(
                f"the objective was set up with {self.target_probs.numel()} classes but the "
                f"model has {num_classes}: check dataset.num_classes"
            )

    def regularised(self, s: Step, h: Tensor, h_bal: Tensor, schedule: NoiseSchedule) -> Result:
        """The loss of the predictions at the labels (``h``) and at the drawn ``y'``
        (``h_bal``): DDPM's, the regulariser and the commitment term."""
        ddpm = mse(h, s.noise)
        # Only samples fed a real label regularise (all of them under batch-mode dropout).
        keep = (s.y_in != s.model.null_label).float()
        w = timestep_weight(s.t, schedule.num_timesteps, self.tau) * keep
        reg = (w * mse(h, h_bal.detach(), per_sample=True)).mean()
        commit = (w * mse(h.detach(), h_bal, per_sample=True)).mean()
        loss = ddpm + reg + self.gamma * commit
        terms = {"ddpm": ddpm.detach(), "reg": reg.detach(), "commit": commit.detach()}
        return ObjectiveOutput(loss, terms), s.context(h)
