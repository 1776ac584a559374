"""Long-tailed classification losses: cross-entropy, LDAM with deferred re-weighting (DRW), and
logit adjustment in its loss and post-hoc forms.

With logits ``z`` (B, C), labels ``y``, training counts ``n_c`` and priors ``pi_c = n_c / sum n``:

* **CE**: ``-log softmax(z)_y``.
* **LDAM** (Cao et al. 2019, eq. 13 and their code): ``m_c = K / n_c^(1/4)`` with ``K`` such
  that ``max_c m_c = max_margin`` (0.5); the target logit loses its margin and everything is
  scaled by ``s`` (30): ``-log softmax(s (z - m_y e_y))_y``. Used with a cosine head
  (:class:`~lt_diffusion.classification.resnet.NormedLinear`), so ``z`` are cosines.
* **DRW** (Cao et al. 2019, Alg. 1; class-balanced weights of Cui et al. 2019): from epoch
  ``drw_epoch`` (160 of 200) each sample is weighted by ``w_y = (1 - beta) / (1 - beta^n_y)``
  (``beta`` 0.9999), normalised to ``sum_c w_c = C``; the batch loss is the weighted mean
  ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (PyTorch's ``cross_entropy(weight=...)``, as their
  code). Before that epoch all weights are 1.
* **Logit-adjusted loss** (Menon et al. 2021, eq. 10): ``-log softmax(z + tau log pi)_y``.
* **Post-hoc logit adjustment** (Menon et al. 2021, eq. 9): prediction
  ``argmax_y z_y - tau log pi_y`` of a model trained with any loss (``posthoc_tau``; 0: off).

Every loss takes the counts once (:meth:`ClassificationLoss.setup`) and the epoch at each step
(DRW switches on by epoch). The class statistics are kept in float64 and cast to the logits'
dtype when used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _counts(class_counts: Sequence[int] | Tensor) -> Tensor:
    values = class_counts.tolist() if isinstance(class_counts, Tensor) else list(class_counts)
    counts = torch.tensor([float(c) for c in values], dtype=torch.float64)
    if counts.numel() < 2:
        raise ValueError(f"a classification loss needs the counts of >= 2 classes, got {values}")
    empty = [c for c, n in enumerate(counts.tolist()) if n <= 0]
    if empty:
        raise ValueError(
            f"classes {empty} have no training images: the class-dependent losses (LDAM, logit "
            "adjustment, DRW) need every class present; lower the imbalance ratio"
        )
    return counts


def effective_number_weights(class_counts: Sequence[int] | Tensor, beta: float) -> Tensor:
    """Class-balanced weights (Cui et al. 2019): ``(1 - beta) / (1 - beta^n_c)`` normalised to
    sum to C, float64. ``beta = 0`` gives all ones."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"loss.drw_beta must be in [0, 1), got {beta}")
    n = _counts(class_counts)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return w / w.sum() * n.numel()


def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float) -> Tensor:
    """LDAM's per-class margins ``m_c = K n_c^(-1/4)``, the largest (rarest class) equal to
    ``max_margin``; float64."""
    if max_margin <= 0:
        raise ValueError(f"loss.max_margin must be > 0, got {max_margin}")
    m = _counts(class_counts).pow(-0.25)
    return m * (max_margin / m.max())


def log_priors(class_counts: Sequence[int] | Tensor) -> Tensor:
    """``log pi_c`` with ``pi_c = n_c / sum n``, float64."""
    n = _counts(class_counts)
    return torch.log(n / n.sum())


class ClassificationLoss(nn.Module):
    """The shared part: class counts, DRW weights and the post-hoc adjustment.

    Args:
        drw_epoch: the epoch from which DRW's class-balanced weights apply (None: never).
        drw_beta: the effective-number ``beta`` of those weights.
        posthoc_tau: ``tau`` of the post-hoc logit adjustment at prediction (0: none).
    """

    name = "base"

    def __init__(
        self, drw_epoch: int | None = None, drw_beta: float = 0.9999, posthoc_tau: float = 0.0
    ) -> None:
        super().__init__()
        if drw_epoch is not None and drw_epoch < 0:
            raise ValueError(f"loss.drw_epoch must be >= 0 or null, got {drw_epoch}")
        if not 0.0 <= drw_beta < 1.0:
            raise ValueError(f"loss.drw_beta must be in [0, 1), got {drw_beta}")
        if posthoc_tau < 0 or not math.isfinite(posthoc_tau):
            raise ValueError(f"loss.posthoc_tau must be >= 0, got {posthoc_tau}")
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)
        self.drw_beta = float(drw_beta)
        self.posthoc_tau = float(posthoc_tau)
        # Derived from the counts at setup (not saved: a resumed run derives them again).
        self.register_buffer("class_counts", torch.zeros(0, dtype=torch.float64), persistent=False)
        self.register_buffer("drw_weights", torch.zeros(0, dtype=torch.float64), persistent=False)
        self.register_buffer("log_prior", torch.zeros(0, dtype=torch.float64), persistent=False)

    def setup(self, class_counts: Sequence[int]) -> None:
        """Take the training counts (class 0 first); called once before training."""
        device = self.class_counts.device
        self.class_counts = _counts(class_counts).to(device)
        self.log_prior = log_priors(class_counts).to(device)
        if self.drw_epoch is not None:
            self.drw_weights = effective_number_weights(class_counts, self.drw_beta).to(device)

    def _ready(self) -> None:
        if self.class_counts.numel() == 0:
            raise RuntimeError("loss.setup(class_counts) must be called before the first step")

    def class_weights(self, epoch: int) -> Tensor | None:
        """DRW's weights at ``epoch`` (None: unweighted)."""
        if self.drw_epoch is None or epoch < self.drw_epoch:
            return None
        return self.drw_weights

    def per_sample_logits(self, logits: Tensor, y: Tensor) -> Tensor:
        """The logits the softmax cross-entropy is taken of (the method's change)."""
        return logits

    def forward(self, logits: Tensor, y: Tensor, epoch: int = 0) -> Tensor:
        self._ready()
        weights = self.class_weights(epoch)
        z = self.per_sample_logits(logits, y)
        return F.cross_entropy(z, y, weight=None if weights is None else weights.to(z.dtype))

    def prediction_logits(self, logits: Tensor) -> Tensor:
        """What the prediction is the argmax of: ``z - tau log pi`` (post-hoc adjustment)."""
        if self.posthoc_tau == 0.0:
            return logits
        self._ready()
        return logits - self.posthoc_tau * self.log_prior.to(logits.dtype)


class CrossEntropyLoss(ClassificationLoss):
    """Softmax cross-entropy (optionally with DRW, and post-hoc logit adjustment)."""

    name = "ce"


class LDAMLoss(ClassificationLoss):
    """LDAM (Cao et al. 2019): margins ``m_y`` on the target logit, logits scaled by ``scale``."""

    name = "ldam"

    def __init__(self, max_margin: float = 0.5, scale: float = 30.0, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if scale <= 0:
            raise ValueError(f"loss.scale must be > 0, got {scale}")
        if max_margin <= 0:
            raise ValueError(f"loss.max_margin must be > 0, got {max_margin}")
        self.max_margin, self.scale = float(max_margin), float(scale)
        self.register_buffer("margins", torch.zeros(0, dtype=torch.float64), persistent=False)

    def setup(self, class_counts: Sequence[int]) -> None:
        super().setup(class_counts)
        self.margins = ldam_margins(class_counts, self.max_margin).to(self.class_counts.device)

    def per_sample_logits(self, logits: Tensor, y: Tensor) -> Tensor:
        shift = (
            F.one_hot(y, logits.shape[1]).to(logits.dtype) * self.margins.to(logits.dtype)[y, None]
        )
        return self.scale * (logits - shift)


class LogitAdjustedLoss(ClassificationLoss):
    """The logit-adjusted softmax cross-entropy (Menon et al. 2021, eq. 10): ``z + tau log pi``."""

    name = "la"

    def __init__(self, tau: float = 1.0, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if tau < 0 or not math.isfinite(tau):
            raise ValueError(f"loss.tau must be >= 0, got {tau}")
        self.tau = float(tau)

    def per_sample_logits(self, logits: Tensor, y: Tensor) -> Tensor:
        return logits + self.tau * self.log_prior.to(logits.dtype)
