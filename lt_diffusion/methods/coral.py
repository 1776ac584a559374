"""CORAL, contrastive latent alignment in the U-Net bottleneck (the CORAL paper, Sec. 3;
code SankarLab/coral-lt-diffusion, ``diffusion.py``).

A wrapper around a base objective (DDPM; CBDM for ``cbdm_coral``). On the base's noised batch
``x_t, t`` and labels ``y`` the bottleneck feature (after the U-Net's middle blocks) is
global-average-pooled, projected by ``Linear(C_mid -> 128)`` (a submodule of this objective,
trained with the model) and L2-normalised to ``z``. The supervised contrastive loss of Khosla et
al. (2020, eq. 2, "L_out")::

    L_sup = mean_{i: |P(i)| > 0}  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / T_c)
                                                             / sum_{a != i} exp(z_i.z_a / T_c) )

with ``P(i)`` the other samples of ``i``'s class and temperature ``T_c = 0.1``, is added as::

    L = L_base + weight * mean_b( exp((1 - t_b / T) / s) ) * L_sup,   weight 0.5, s = 0.3

(strongest near ``t = 0``, where class content is decided). The public code multiplies once
more by 0.1 and, without mixed precision, loses the CBDM term; neither is reproduced: the weight
is explicit. Anchors without a positive in the batch are left out of the mean. The loss compares
class labels, so it is skipped on a batch whose condition was dropped for classifier-free
guidance; with per-sample dropout the null-label samples take no part (neither as anchors nor in
the denominators).

The bottleneck is that of the base's own forward on ``x_t, t, y_in``: the base is given the
model through :class:`BottleneckTap`, which calls it with ``return_bottleneck=True`` and keeps
the features. A base that predicts otherwise (CBDM's labels fused into one batch) costs one
extra forward with ``return_bottleneck=True`` on ``x_t, t, y_in``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Aug, Model, Objective, ObjectiveOutput, Result
from lt_diffusion.methods.common import WrappingObjective


def supcon_loss(
    z: Tensor, labels: Tensor, temperature: float = 0.1, valid: Tensor | None = None
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, eq. 2) of L2-normalised ``z`` (B, D).

    ``valid`` (B,) bool marks the samples that take part (default: all). Anchors with no
    positive are left out; with no anchor at all the loss is 0 (keeping the graph).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z.shape[0]
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=z.device)
    eye = torch.eye(b, dtype=torch.bool, device=z.device)
    pair = valid[:, None] & valid[None, :] & ~eye  # the set A(i), row i
    pos = pair & (labels[:, None] == labels[None, :])  # the set P(i)
    logits = (z @ z.T) / temperature
    # A large finite negative, not -inf: a row with no pair (a null-label sample) must not
    # turn into NaN in logsumexp's backward. exp() of it underflows to exactly 0.
    logits = logits.masked_fill(~pair, torch.finfo(logits.dtype).min / 4)
    log_den = torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = (logits - log_den).masked_fill(~pos, 0.0)
    n_pos = pos.sum(1)
    per_anchor = -log_prob.sum(1) / n_pos.clamp_min(1)
    has = (n_pos > 0).to(per_anchor.dtype)
    return (per_anchor * has).sum() / has.sum().clamp_min(1.0)


class BottleneckTap:
    """The model as a base objective calls it, run with ``return_bottleneck=True``: the caller
    gets the prediction, and the bottleneck of each call is kept (:meth:`features`), so the
    contrastive term needs no second forward. Attributes are the model's."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.calls: list[tuple[Tensor, Tensor, Tensor | None, Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get("return_bottleneck"):  # the caller asks for the features itself
            return self.model(x, t, y, **kwargs)
        eps, h_mid = self.model(x, t, y, return_bottleneck=True, **kwargs)
        self.calls.append((x, t, y, h_mid))
        return eps

    def features(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor | None:
        """The bottleneck of a call on these very tensors, or None if there was none."""
        for cx, ct, cy, h_mid in self.calls:
            if cx is x and ct is t and cy is y:
                return h_mid
        return None


class CORALObjective(WrappingObjective):
    """A base objective plus CORAL's supervised contrastive loss on the bottleneck.

    Args:
        base: the wrapped objective (DDPM default; CBDM for ``cbdm_coral``).
        feature_dim: bottleneck channels ``C_mid``; ``None`` derives it from
            ``backbone_ch * backbone_ch_mult[-1]`` (the U-Net's width after the last level).
        backbone_ch, backbone_ch_mult: the U-Net's ``ch`` and ``ch_mult`` (configs interpolate
            ``${model.ch}``, ``${model.ch_mult}``).
        proj_dim: output width of the projection head (paper: 128).
        temperature: SupCon temperature (paper: 0.1).
        weight: loss weight (paper: 0.5).
        time_scale: ``s`` of the timestep weight ``exp((1 - t/T) / s)`` (paper: 0.3).
    """

    name = "coral"
    passes = 0  # the contrastive term reads the bottleneck of the base's forward (DDPM's)

    def __init__(
        self,
        base: Objective | None = None,
        feature_dim: int | None = None,
        backbone_ch: int | None = None,
        backbone_ch_mult: Sequence[int] | None = None,
        proj_dim: int = 128,
        temperature: float = 0.1,
        weight: float = 0.5,
        time_scale: float = 0.3,
    ) -> None:
        if base is None:
            from lt_diffusion.methods.ddpm import DDPMObjective

            base = DDPMObjective()
        super().__init__(base)
        if feature_dim is None:
            if backbone_ch is None or not backbone_ch_mult:
                raise ValueError(
                    "CORAL needs the bottleneck width: set method.objective.feature_dim, or "
                    "backbone_ch and backbone_ch_mult (${model.ch}, ${model.ch_mult})"
                )
            feature_dim = int(backbone_ch) * int(list(backbone_ch_mult)[-1])
        if feature_dim < 1 or proj_dim < 1:
            raise ValueError(
                f"feature_dim and proj_dim must be >= 1, got {feature_dim}, {proj_dim}"
            )
        if temperature <= 0 or time_scale <= 0:
            raise ValueError(
                f"temperature and time_scale must be > 0, got {temperature}, {time_scale}"
            )
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.feature_dim = int(feature_dim)
        self.proj = nn.Linear(self.feature_dim, int(proj_dim))
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.time_scale = float(time_scale)

    def embed(self, h_mid: Tensor) -> Tensor:
        """Pool (B, C, H, W) -> (B, C) (an MLP's (B, C) bottleneck is already pooled), project,
        L2-normalise (float32 or wider)."""
        if h_mid.shape[1] != self.feature_dim:
            raise ValueError(
                f"the model's bottleneck has {h_mid.shape[1]} channels but CORAL's projection "
                f"head expects {self.feature_dim}: set method.objective.feature_dim="
                f"{h_mid.shape[1]}"
            )
        pooled = h_mid.reshape(*h_mid.shape[:2], -1).mean(dim=2).to(self.proj.weight.dtype)
        z = self.proj(pooled)
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)

    def time_weight(self, t: Tensor, num_timesteps: int) -> Tensor:
        """``mean_b exp((1 - t_b / T) / s)``, a scalar."""
        return torch.exp((1.0 - t.double() / num_timesteps) / self.time_scale).mean()

    def compute(
        self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Aug = None
    ) -> Result:
        tap = BottleneckTap(model)
        out, ctx = self.base.compute(tap, x0, y, schedule, aug_labels)
        terms = dict(out.terms)
        terms["base"] = out.loss.detach()
        if ctx.dropped or self.weight == 0.0:  # host-side decisions: no sync
            terms["supcon"] = torch.zeros((), device=out.loss.device)
            return ObjectiveOutput(out.loss, terms), ctx

        h_mid = tap.features(ctx.x_t, ctx.t, ctx.y_in)
        if h_mid is None:  # the base's prediction was not one plain call (CBDM's fused labels)
            kwargs = {} if ctx.aug_labels is None else {"aug_labels": ctx.aug_labels}
            _, h_mid = model(ctx.x_t, ctx.t, ctx.y_in, return_bottleneck=True, **kwargs)
        z = self.embed(h_mid)
        valid = ctx.y_in != model.null_label
        sup = supcon_loss(z, ctx.y_in, self.temperature, valid)
        w_t = self.time_weight(ctx.t, schedule.num_timesteps).to(sup.dtype)
        loss = out.loss + self.weight * w_t * sup
        terms["supcon"] = sup.detach()
        return ObjectiveOutput(loss, terms), ctx


__all__ = ["BottleneckTap", "CORALObjective", "supcon_loss"]
