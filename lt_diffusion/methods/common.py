"""Pieces shared by the objectives: the base of the wrapping methods (CM, ADA, CORAL,
Group-Expert LoRA) and small numeric helpers. The interface itself is :mod:`.base`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lt_diffusion.methods.base import (  # noqa: F401  (Aug ... Step: imported from here before)
    Aug,
    Model,
    Objective,
    Result,
    Step,
    call_model,
    call_model_labels,
    check_choice,
    mse,
)
from lt_diffusion.utils import draws

# Target-label distributions of the class-balancing regulariser (CBDM, PD-CBDM).
TARGET_DISTS = ("empirical", "uniform", "inverse")


def timestep_weight(t: Tensor, num_timesteps: int, tau: float) -> Tensor:
    """CBDM's ``w_t = tau * t / T`` as float32, shape (B,)."""
    return t.float() * (float(tau) / num_timesteps)


def label_distribution(class_counts: Tensor, kind: str) -> Tensor:
    """A distribution over the ``C`` classes, float32 of shape (C,).

    ``"empirical"``: the training class frequency ``N_c / sum N``; ``"uniform"``: ``1 / C``;
    ``"inverse"``: proportional to ``1 / N_c`` (PD-CBDM). Classes with no training image get
    probability 0 under ``empirical`` and ``inverse``.
    """
    check_choice("target_dist", kind, TARGET_DISTS)
    counts = class_counts.float()
    if counts.numel() == 0:
        raise RuntimeError("objective.setup(class_counts) must be called before training")
    if kind == "empirical":
        weights = counts
    elif kind == "uniform":
        weights = torch.ones_like(counts)
    else:
        weights = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    return weights / weights.sum()


def draw_labels(probs: Tensor, n: int) -> Tensor:
    """``n`` labels drawn i.i.d. from ``probs`` (C,) by inverse CDF, on its device.

    Not ``torch.multinomial``: some of its paths validate the distribution with a host
    synchronisation. ``u = U[0, 1) * sum(p)``, label = the first ``c`` with ``cdf_c > u``
    (classes of probability 0 are never drawn).
    """
    cdf = probs.float().cumsum(0)
    u = draws.rand((n,), probs.device) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.numel() - 1)


def sample_categorical(logits: Tensor) -> Tensor:
    """One index per row of ``logits`` (B, K) drawn from ``softmax(logits)`` by inverse CDF:
    ``u = U[0, 1) * cdf_K``, the index the first ``c`` with ``cdf_c > u`` (one uniform per row,
    so the keyed draws of the seed-vectorised training cost B numbers, not B K). The softmax
    subtracts the row's maximum, so very negative logits (OC's at small t) only underflow to
    probability 0, never drawn; nothing synchronises with the host."""
    cdf = torch.softmax(logits, dim=1).cumsum(dim=1)
    u = draws.rand((logits.shape[0], 1), logits.device, cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(logits.shape[1] - 1)


class WrappingObjective(Objective):
    """A method that wraps a base objective (CM, ADA, CORAL, Group-Expert LoRA): label dropout
    is the base's, and the base is set up with the same class counts."""

    def __init__(self, base: Objective) -> None:
        super().__init__(cond_drop_prob=0.0, cond_drop_mode="none")
        if not isinstance(base, Objective):
            raise TypeError(
                f"{type(self).__name__} needs a composable base objective (DDPM, CBDM, OC, "
                f"...), got {type(base).__name__}"
            )
        self.base = base

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        super().setup(class_counts, seed)
        self.base.setup(class_counts, seed)


# The names of the composable interface before it became Objective itself (one release).
ComposableObjective = Objective
BaseContext = Step
