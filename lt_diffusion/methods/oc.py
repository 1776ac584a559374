"""OC, oriented calibration (Zhang et al., ICLR 2024; MediaBrain-SJTU/OC_LT, diffusion.py).

No extra loss term: the regression *target* changes. For anchor ``i`` of the batch, with
``sigma_t^2 = 1 / abar_t - 1`` and ``c_i = x_t,i / sqrt(abar_t)``, every batch member ``j``
(``i`` itself included) gets the logit ``l_ij = -||c_i - x0_j||^2 / (2 sigma_{t_i}^2)``
(the log-likelihood of ``x_t,i`` under ``x0_j``, up to a constant); one ``j`` is drawn from
``softmax(l_i)`` and accepted by a frequency gate, else ``j = i``. The target is the noise that
would have produced ``x_t,i`` from ``x0_j``::

    eps_hat = (x_t,i - sqrt(abar_t) x0_j) / sqrt(1 - abar_t),   L = ||eps_theta(x_t,i, t, y_i) - eps_hat||^2

Following the authors' code: the transfer applies to every sample of every batch (no
probability or weight, no timestep cut-off: ``cut_time = -1``), also on batches whose condition
was dropped for CFG; the gate compares the *true* labels' training frequencies; the condition
stays ``y_i``; no gradient flows through the selection.

Two options of ours: ``cut_time`` (the code's name and default) transfers only for anchors with
``t > cut_time``; ``ties: reject`` refuses a reference of *another* class whose training
frequency equals the anchor's. The published ``t2h`` gate (``q_ref >= q_anchor``) accepts
those ties, so on balanced data (every frequency equal) it accepts every drawn reference and
``t2h`` becomes ``full`` transfer; ``reject`` keeps only same-class references there.

Logged: ``transfer`` (share of anchors whose target moved), ``cross_transfer`` (moved to a
reference of another class) and ``cross_t<k>``, the cross-class share among the anchors of
timestep bucket ``k`` (``log_buckets`` equal buckets of ``[0, T)``, 0 for none).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, check_choice, mse
from lt_diffusion.methods.common import sample_categorical

# "t2h" (the README's training command) accepts a reference from a class at least as frequent
# as the anchor's (knowledge flows from head to tail); "h2t" reverses it; "full" accepts all.
GATES = ("t2h", "h2t", "full")
# What the gate does with a reference of another class of equal training frequency.
TIES = ("accept", "reject")


def _at_least_f32(x: Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64 (exact tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def oc_selection_logits(x_t: Tensor, x0: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The (B, B) logits ``l_ij = -||x_t,i / sqrt(abar_i) - x0_j||^2 / (2 sigma_i^2)``.

    Distances are taken directly (not via ``|a|^2 - 2ab + |b|^2``), whose cancellation would
    lose the small self-distance at low t in float32.
    """
    dt = _at_least_f32(x_t)
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        inv_sqrt_abar = schedule.gather(schedule.sqrt_recip_alphas_cumprod, t, 2).to(dt)
        sigma2 = schedule.gather(schedule.sqrt_recipm1_alphas_cumprod, t, 2).to(dt).square()
        c = x_t.to(dt).flatten(1) * inv_sqrt_abar
        d2 = torch.cdist(
            c, x0.to(dt).flatten(1), compute_mode="donot_use_mm_for_euclid_dist"
        ).square()
        return -d2 / (2.0 * sigma2)


def oc_selection_probs(x_t: Tensor, x0: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Row ``i``: the probability of choosing batch member ``j`` as anchor ``i``'s reference."""
    return torch.softmax(oc_selection_logits(x_t, x0, t, schedule), dim=1)


def oc_gate(q_anchor: Tensor, q_ref: Tensor, gate: str, same_class: Tensor | None = None) -> Tensor:
    """Whether a drawn reference is accepted, from the two labels' training frequencies.
    ``same_class`` given (``ties: reject``): a reference of another class accepted only on a
    strict inequality, one of the anchor's own class always."""
    if gate == "t2h":
        ok = q_ref >= q_anchor if same_class is None else q_ref > q_anchor
    elif gate == "h2t":
        ok = q_ref <= q_anchor if same_class is None else q_ref < q_anchor
    elif gate == "full":
        return torch.ones_like(q_anchor, dtype=torch.bool)
    else:
        raise ValueError(f"OC gate must be one of {GATES}, got {gate!r}")
    return ok if same_class is None else ok | same_class


def oc_target(x_t: Tensor, x0_ref: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``eps_hat = (x_t - sqrt(abar_t) x0_ref) / sqrt(1 - abar_t)``, at least float32."""
    dt = _at_least_f32(x_t)
    a = schedule.gather(schedule.sqrt_alphas_cumprod, t, x_t.ndim).to(dt)
    s = schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim).to(dt)
    return (x_t.to(dt) - a * x0_ref.to(dt)) / s


class OCObjective(Objective):
    """Epsilon regression onto OC's batch-transferred target.

    Args:
        gate: ``"t2h"`` (default, the authors' training command), ``"h2t"`` or ``"full"``.
        ties: ``"accept"`` (the published gate) or ``"reject"`` (another class of equal
            frequency is refused), see the module docstring.
        cut_time: transfer only for anchors with ``t > cut_time`` (-1: always, the code's).
        log_buckets: timestep buckets of the logged cross-class transfer rate (0: none).
        cond_drop_prob, cond_drop_mode: CFG label dropout, see :class:`Objective`.
    """

    name = "oc"

    def __init__(
        self,
        gate: str = "t2h",
        ties: str = "accept",
        cut_time: int = -1,
        log_buckets: int = 10,
        **dropout: Any,
    ) -> None:
        super().__init__(**dropout)
        check_choice("gate", gate, GATES)
        check_choice("ties", ties, TIES)
        if int(log_buckets) < 0:
            raise ValueError(f"method.objective.log_buckets must be >= 0, got {log_buckets}")
        self.gate, self.ties = gate, ties
        self.cut_time, self.log_buckets = int(cut_time), int(log_buckets)

    @torch.no_grad()
    def select(
        self, x_t: Tensor, x0: Tensor, y: Tensor, t: Tensor, schedule: NoiseSchedule
    ) -> Tensor:
        """The reference index of every anchor, (B,) int64: drawn, then gated."""
        # A draw from softmax(l_i) per row.
        j = sample_categorical(oc_selection_logits(x_t, x0, t, schedule))
        q = self.class_freq
        same = (y[j] == y) if self.ties == "reject" else None
        keep = oc_gate(q[y], q[y[j]], self.gate, same) & (t > self.cut_time)
        return torch.where(keep, j, torch.arange(y.shape[0], device=y.device))

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        j = self.select(s.x_t, x0, y, s.t, schedule)
        with torch.no_grad():
            # oc_target(x_t, x0[j]) rewritten with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps:
            # eps + sqrt(abar / (1 - abar)) (x0 - x0[j]) has no cancellation at small t, and
            # is exactly eps where the target was not transferred.
            dt = _at_least_f32(x0)
            sigma = schedule.gather(schedule.sqrt_recipm1_alphas_cumprod, s.t, x0.ndim).to(dt)
            target = s.noise.to(dt) + (x0.to(dt) - x0[j].to(dt)) / sigma
        eps = s.predict()
        loss = mse(eps, target)
        with torch.no_grad():
            cross = (y[j] != y).float()
            terms = {
                "mse": loss.detach(),
                "ddpm": mse(eps, s.noise),  # the plain DDPM loss, for comparison across methods
                "transfer": (j != torch.arange(j.shape[0], device=j.device)).float().mean(),
                "cross_transfer": cross.mean(),
                **self.bucket_rates(cross, s.t, schedule.num_timesteps),
            }
        return ObjectiveOutput(loss, terms), s.context(eps, target)

    def bucket_rates(self, cross: Tensor, t: Tensor, num_timesteps: int) -> dict[str, Tensor]:
        """``cross_t<k>``: the mean of ``cross`` over the anchors of timestep bucket ``k``
        (0 where the batch has none)."""
        if self.log_buckets == 0:
            return {}
        k = (t * self.log_buckets) // num_timesteps
        onehot = (k[:, None] == torch.arange(self.log_buckets, device=t.device)).float()
        rates = (onehot * cross[:, None]).sum(0) / onehot.sum(0).clamp_min(1.0)
        return {f"cross_t{b}": rates[b] for b in range(self.log_buckets)}
