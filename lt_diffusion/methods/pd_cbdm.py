"""PD-CBDM (the PD-CBDM paper, Secs. 3.2-3.4, eqs. 7, 10-11, Algorithm 1).

Three parts on top of CBDM (:class:`~lt_diffusion.methods.cbdm.CBDMObjective`):

1. *Re-weighting*: the target label ``y'`` of CBDM's regulariser is drawn with probability
   proportional to ``1 / N_y`` (``target_dist: inverse``).
2. *Perceptual distinguish loss* (eqs. 10-11): classes sorted by training count (class 0 the
   most frequent) are split into head = the first ``round(ratio * C)`` classes (at least 1, at
   most ``C - 1``; paper Sec. 4.3.2: 7:3) and tail = the rest. Per sample a head label ``y_h``
   and a tail label ``y_t`` are drawn from the data distribution of their group (Algorithm 1,
   line 7: "the distribution of head / tail data after segmentation"), i.e. with probability
   proportional to the class's training count within the group; on CBDM's ``x_t, t`` the
   reverse-process means (eq. 7)::

       mu(x_t, t, y) = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t, y)) / sqrt(alpha_t)

   give ``L_pd = mean_b( (tau t / T) exp(-mean_pixels (mu_h - mu_t)^2) )`` and the loss adds
   ``weight * L_pd``. With a shared fixed variance the KL between the two reverse Gaussians is
   the squared distance of the means (up to a constant); ``exp(-.)`` bounds the reward for
   pushing them apart.
3. *Timestep-dependent self-attention* is a model option (``model.tsa_resolutions=[16]``,
   :class:`lt_diffusion.models.unet.TimestepSelfAttention`), not part of the objective.

The distinguish loss uses its own head / tail labels, not the batch labels, so it is computed on
every batch, including those whose condition was dropped for classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import ObjectiveOutput, Result, Step
from lt_diffusion.methods.cbdm import CBDMObjective
from lt_diffusion.methods.common import draw_labels, timestep_weight


def head_tail_split(class_counts: Sequence[int] | Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Head and tail class indices (int64): classes sorted by count, most frequent first
    (ties by class index), head = the first ``round(ratio * C)`` (half rounds up), clamped to
    ``[1, C - 1]``."""
    values = class_counts.tolist() if isinstance(class_counts, Tensor) else list(class_counts)
    c = len(values)
    if c < 2:
        raise ValueError(f"the head/tail split needs at least 2 classes, got {c}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"head_ratio must be in (0, 1), got {ratio} (paper: 0.7 for 7:3)")
    order = sorted(range(c), key=lambda k: (-float(values[k]), k))
    n_head = min(max(int(math.floor(ratio * c + 0.5)), 1), c - 1)
    return torch.tensor(order[:n_head]), torch.tensor(order[n_head:])


def reverse_mean_from_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Eq. 7: ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``, in at least float32."""
    dtype = torch.promote_types(torch.promote_types(x_t.dtype, eps.dtype), torch.float32)
    beta = schedule.gather(schedule.betas, t, x_t.ndim).to(dtype)
    alpha = schedule.gather(schedule.alphas, t, x_t.ndim).to(dtype)
    s = schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim).to(dtype)
    return (x_t.to(dtype) - beta / s * eps.to(dtype)) / alpha.sqrt()


class PDCBDMObjective(CBDMObjective):
    """CBDM with PD-CBDM's re-weighted target labels and perceptual distinguish loss.

    Args:
        target_dist: ``"inverse"`` (PD-CBDM's re-weighting) or CBDM's ``"empirical"`` (the
            "+ perceptual distinguish loss" ablation row).
        use_pd_loss: add the perceptual distinguish loss (``False``: CBDM with re-weighting).
        pd_weight: its weight (paper: 0.1).
        head_ratio: fraction of classes, by frequency, in the head group (paper: 0.7).
        cbdm: CBDM's settings (``tau``, ``gamma``, ``fused_forward``, ``cond_drop_prob``,
            ``cond_drop_mode``), see :class:`~lt_diffusion.methods.cbdm.CBDMObjective`.
    """

    name = "pd_cbdm"
    passes = 4  # y, y', a head and a tail label (one forward of 4B when fused)

    def __init__(
        self,
        use_pd_loss: bool = True,
        pd_weight: float = 0.1,
        head_ratio: float = 0.7,
        target_dist: str = "inverse",
        **cbdm: Any,
    ) -> None:
        super().__init__(target_dist=target_dist, **cbdm)
        if pd_weight < 0:
            raise ValueError(f"pd_weight must be >= 0, got {pd_weight}")
        if not 0.0 < head_ratio < 1.0:
            raise ValueError(f"head_ratio must be in (0, 1), got {head_ratio} (paper: 0.7)")
        self.use_pd_loss = bool(use_pd_loss)
        self.pd_weight = float(pd_weight)
        self.head_ratio = float(head_ratio)
        # Each group's classes and their training counts (the weights of the draw), in step.
        for name in ("head_classes", "tail_classes"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long), persistent=False)
        for name in ("head_counts", "tail_counts"):
            self.register_buffer(name, torch.zeros(0), persistent=False)

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        super().setup(class_counts, seed)
        head, tail = head_tail_split(class_counts, self.head_ratio)
        dev = self.class_counts.device
        self.head_classes, self.tail_classes = head.to(dev), tail.to(dev)
        self.head_counts = self.class_counts[self.head_classes]
        self.tail_counts = self.class_counts[self.tail_classes]
        if float(self.tail_counts.sum()) <= 0:
            raise ValueError(
                f"the tail group {tail.tolist()} has no training images, so no tail label can "
                "be drawn: raise method.objective.head_ratio or check the class counts"
            )

    def head_tail_labels(self, n: int) -> tuple[Tensor, Tensor]:
        """One head and one tail label per sample, each from its group's data distribution
        (probability proportional to the class count within the group; Algorithm 1, line 7).
        Drawn by inverse CDF on the device (no host synchronisation); an index into the group,
        so a label outside the group is never drawn."""
        if self.head_classes.numel() == 0:
            raise RuntimeError("objective.setup(class_counts) must be called before training")
        ih = draw_labels(self.head_counts, n)
        it = draw_labels(self.tail_counts, n)
        return self.head_classes[ih], self.tail_classes[it]

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        if not self.use_pd_loss or self.pd_weight == 0.0:
            out, ctx = super().loss(s, x0, y, schedule)
            zero = torch.zeros((), device=out.loss.device)
            return ObjectiveOutput(out.loss, {**out.terms, "pd": zero}), ctx
        if s.dropped:  # CBDM's plain loss on a dropped batch; the PD term still applies
            out, ctx = super().loss(s, x0, y, schedule)
            eps_h, eps_t = s.predict_labels(self.head_tail_labels(y.shape[0]), self.fused_forward)
            return self.with_pd(out, ctx, s, eps_h, eps_t, schedule)
        # The labels are drawn in CBDM's order (y', then head, then tail); the four
        # predictions on the same x_t are one forward.
        self.check_classes(s)
        y_bal = self.target_labels(y.shape[0])
        y_head, y_tail = self.head_tail_labels(y.shape[0])
        h, h_bal, eps_h, eps_t = s.predict_labels(
            [s.y_in, y_bal, y_head, y_tail], self.fused_forward
        )
        out, ctx = self.regularised(s, h, h_bal, schedule)
        return self.with_pd(out, ctx, s, eps_h, eps_t, schedule)

    def with_pd(
        self,
        out: ObjectiveOutput,
        ctx: Step,
        s: Step,
        eps_h: Tensor,
        eps_t: Tensor,
        schedule: NoiseSchedule,
    ) -> Result:
        """CBDM's loss ``out`` plus the perceptual distinguish loss of the head- and tail-label
        predictions (eq. 10): the time-weighted ``exp(-||mu_h - mu_t||^2)``."""
        mu_h = reverse_mean_from_eps(schedule, s.x_t, s.t, eps_h)
        mu_t = reverse_mean_from_eps(schedule, s.x_t, s.t, eps_t)
        dist = (mu_h - mu_t).pow(2).flatten(1).mean(1)
        w = timestep_weight(s.t, schedule.num_timesteps, self.tau).to(dist.dtype)
        pd = (w * torch.exp(-dist)).mean()
        terms = {**out.terms, "pd": pd.detach()}
        return ObjectiveOutput(out.loss + self.pd_weight * pd, terms), ctx
