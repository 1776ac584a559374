"""CM, capacity manipulation (the CM paper, Sec. 3.2, eqs. 2-4 and Algorithm C.1).

The model's selected weights are decomposed as ``W = W_g + B A`` by the method's model
transform (:func:`lt_diffusion.models.lowrank.reserve_capacity`). With ``eps = eps_theta(x_t, t, y)``
(the full model) and ``eps_g = eps_theta_g(x_t, t, y)`` (the ``B A`` parts switched off)::

    d       = ||eps - eps_g||^2                      (mean over pixels, per sample)
    L_Con   =  mean_batch( w_con(y) d )              w_con(y) = C N_y / sum_c N_c
    L_Div   = -mean_batch( w_div(y) d )              w_div(y) = C / (N_y sum_c 1 / N_c)
    L_CM    = L_Con + L_Div = mean_batch( (w_con(y) - w_div(y)) d )
    L       = L_base + lam * L_CM

No stop-gradient anywhere (Algorithm C.1 descends ``grad_{theta_g, theta_e}`` of the total):
``d`` pulls ``theta`` and ``theta_g`` together for frequent classes and pushes them apart for
rare ones, through both branches. The ablations drop one term exactly: without ``L_Con`` the
loss is ``L_base - lam mean(w_div d)``, without ``L_Div`` it is ``L_base + lam mean(w_con d)``.

``eps`` is the base objective's own prediction (:class:`Step`), so CM costs one extra
forward (``theta_g``, same ``x_t, t, y``) per step. The per-class weights are defined for real
labels only, so CM is skipped where the condition was dropped for classifier-free guidance: on a
batch-dropped batch there is no extra forward at all; with per-sample dropout the null samples
get weight 0 and the sum is still divided by the batch size (as CBDM's regulariser does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import (
    Aug,
    Model,
    Objective,
    ObjectiveOutput,
    Result,
    call_model,
    mse,
)
from lt_diffusion.methods.common import WrappingObjective
from lt_diffusion.models.lowrank import expert_switch


def cm_class_weights(class_counts: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 3: ``(w_con, w_div)``, float64 of shape (C,) (cast to the loss dtype when used).

    ``w_con(y) = C N_y / sum_c N_c`` and ``w_div(y) = C / (N_y sum_c 1 / N_c)``; both are 1
    for every class of a balanced set.
    """
    values = class_counts.tolist() if isinstance(class_counts, Tensor) else list(class_counts)
    counts = torch.tensor([float(c) for c in values], dtype=torch.float64)  # on the host
    if counts.numel() == 0:
        raise ValueError("CM needs the training class counts (none given)")
    if bool((counts <= 0).any()):  # a host tensor: no device sync
        empty = [c for c, n in enumerate(counts.tolist()) if n <= 0]
        raise ValueError(
            f"CM's class weights (eq. 3) need every class to have training images; classes "
            f"{empty} have none. Lower the imbalance ratio or drop those classes."
        )
    c = counts.numel()
    w_con = c * counts / counts.sum()
    w_div = c / (counts * (1.0 / counts).sum())
    return w_con, w_div


class CMObjective(WrappingObjective):
    """A base objective plus the capacity-manipulation loss.

    Args:
        base: the objective trained on the full model (OC in the paper; DDPM, CBDM also).
        lam: weight ``lambda`` of ``L_CM`` (paper: 1.0).
        use_con: keep the consistency term ``L_Con`` (``False``: the "w/o L_Con" ablation).
        use_div: keep the diversity term ``L_Div`` (``False``: the "w/o L_Div" ablation).
    """

    name = "cm"
    passes = 1  # the reserved-capacity-free model's prediction, beside the base's

    def __init__(
        self,
        base: Objective,
        lam: float = 1.0,
        use_con: bool = True,
        use_div: bool = True,
    ) -> None:
        # Classifier-free-guidance dropout is the base objective's business.
        super().__init__(base)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.use_con = bool(use_con)
        self.use_div = bool(use_div)
        self.register_buffer("w_con", torch.zeros(0), persistent=False)
        self.register_buffer("w_div", torch.zeros(0), persistent=False)

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        super().setup(class_counts, seed)
        w_con, w_div = cm_class_weights(class_counts)
        self.w_con = w_con.to(self.class_counts.device)
        self.w_div = w_div.to(self.class_counts.device)

    def compute(
        self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Aug = None
    ) -> Result:
        if self.w_con.numel() == 0:
            raise RuntimeError("objective.setup(class_counts) must be called before training")
        out, ctx = self.base.compute(model, x0, y, schedule, aug_labels)
        terms = dict(out.terms)
        terms["base"] = out.loss.detach()
        zero = torch.zeros((), device=out.loss.device)

        # Host-side decisions only: nothing here waits for the device.
        if ctx.dropped or self.lam == 0.0 or not (self.use_con or self.use_div):
            terms.update(cm=zero, con=zero, div=zero)
            return ObjectiveOutput(out.loss, terms), ctx

        with expert_switch(model, False) as n_layers:
            if n_layers == 0:
                raise ValueError(
                    "CM found no low-rank layers in the model: keep the method's "
                    "model_transform (lt_diffusion.models.lowrank.reserve_capacity)"
                )
            eps_g = call_model(model, ctx.x_t, ctx.t, ctx.y_in, ctx.aug_labels)

        dist = mse(ctx.eps_pred, eps_g, per_sample=True)  # (B,); gradient through both branches
        null = model.null_label
        real = ctx.y_in != null  # per-sample dropout: null samples carry no class weight
        label = torch.where(real, ctx.y_in, torch.zeros_like(ctx.y_in))
        keep = real.to(dist.dtype)
        con = (self.w_con[label].to(dist.dtype) * keep * dist).mean() if self.use_con else zero
        div = -(self.w_div[label].to(dist.dtype) * keep * dist).mean() if self.use_div else zero
        cm = con + div
        loss = out.loss + self.lam * cm
        terms.update(cm=cm.detach(), con=con.detach(), div=div.detach())
        return ObjectiveOutput(loss, terms), ctx
