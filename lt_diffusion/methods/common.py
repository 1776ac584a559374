"""Pieces shared by the objectives: the composable-objective interface that wrappers (CM, ADA)
build on, the context a base objective hands to its wrapper, and small numeric helpers.

A wrapper needs more than a base objective's loss: CM compares the model's prediction with the
prediction of its reserved-capacity-free part *on the same noised batch and labels*; ADA feeds
augmentation labels into every model call of its base. :class:`ComposableObjective` therefore
exposes :meth:`~ComposableObjective.compute`, which returns the loss together with a
:class:`BaseContext` and accepts the augmentation labels to pass to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, mse
from lt_diffusion.utils import draws

# Target-label distributions of the class-balancing regulariser (CBDM, PD-CBDM).
TARGET_DISTS = ("empirical", "uniform", "inverse")


@dataclass
class BaseContext:
    """What one base-objective step computed, for a wrapping objective.

    Attributes:
        x_t: the noised images fed to the model, (B, C, H, W).
        t: timesteps, (B,) int64.
        noise: the true noise of the forward draw.
        y_in: the labels fed to the model, after CFG dropout (null label where dropped).
        eps_pred: the model's prediction ``eps_theta(x_t, t, y_in)`` (with gradient).
        dropped: whether the whole batch's condition was dropped (batch-mode CFG dropout).
        target: what ``eps_pred`` was regressed onto (``noise``; OC's transferred target).
        aug_labels: augmentation labels given to the model (ADA), else ``None``.
    """

    x_t: Tensor
    t: Tensor
    noise: Tensor
    y_in: Tensor
    eps_pred: Tensor
    dropped: bool
    target: Tensor
    aug_labels: Tensor | None = None


def call_model(
    model: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor, aug_labels: Tensor | None
) -> Tensor:
    """``model(x, t, y)``, with ``aug_labels=`` only when there are any, so backbones without
    the ADA hook (and the exact sampling-time call) are unaffected."""
    if aug_labels is None:
        return model(x, t, y)
    return model(x, t, y, aug_labels=aug_labels)


def call_model_pair(
    model: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    y_a: Tensor,
    y_b: Tensor,
    aug_labels: Tensor | None,
    fused: bool = True,
) -> tuple[Tensor, Tensor]:
    """The predictions for labels ``y_a`` and ``y_b`` on the same ``(x, t)``: one forward over
    the concatenated batch when ``fused`` (one kernel launch per layer, the same numbers up to
    batch-dependent kernels), else two."""
    if not fused:
        return call_model(model, x, t, y_a, aug_labels), call_model(model, x, t, y_b, aug_labels)
    aug2 = None if aug_labels is None else torch.cat([aug_labels, aug_labels])
    out = call_model(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y_a, y_b]), aug2)
    a, b = out.chunk(2)
    return a, b


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample, shape (B,), in float32 (bf16 outputs are upcast)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def timestep_weight(t: Tensor, num_timesteps: int, tau: float) -> Tensor:
    """CBDM's ``w_t = tau * t / T`` as float32, shape (B,)."""
    return t.float() * (float(tau) / num_timesteps)


def label_distribution(class_counts: Tensor, kind: str) -> Tensor:
    """A distribution over the ``C`` classes, float32 of shape (C,).

    ``"empirical"``: the training class frequency ``N_c / sum N``; ``"uniform"``: ``1 / C``;
    ``"inverse"``: proportional to ``1 / N_c`` (PD-CBDM). Classes with no training image get
    probability 0 under ``empirical`` and ``inverse``.
    """
    if kind not in TARGET_DISTS:
        raise ValueError(
            f"target_dist must be one of {TARGET_DISTS}, got {kind!r}: set "
            "method.objective.target_dist accordingly"
        )
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


def sample_labels(probs: Tensor, n: int) -> Tensor:
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


@dataclass
class Step:
    """The start every objective shares: one forward-process draw (``x_t``, ``t``, ``noise``)
    and the labels fed to the model after CFG dropout (``y_in``; ``dropped``: the whole
    batch's condition was dropped). Its methods call the model on that draw."""

    model: Callable[..., Tensor]
    x_t: Tensor
    t: Tensor
    noise: Tensor
    y_in: Tensor
    dropped: bool
    aug_labels: Tensor | None

    def predict(self, labels: Tensor | None = None) -> Tensor:
        """``eps_theta(x_t, t, labels)`` (default: ``y_in``)."""
        y = self.y_in if labels is None else labels
        return call_model(self.model, self.x_t, self.t, y, self.aug_labels)

    def predict_pair(self, y_a: Tensor, y_b: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
        return call_model_pair(self.model, self.x_t, self.t, y_a, y_b, self.aug_labels, fused)

    def context(
        self, eps: Tensor, target: Tensor | None = None, y_in: Tensor | None = None
    ) -> BaseContext:
        """What a wrapping objective needs of this step (``target``: default the noise)."""
        return BaseContext(
            self.x_t, self.t, self.noise, self.y_in if y_in is None else y_in, eps,
            self.dropped, self.noise if target is None else target, self.aug_labels,
        )  # fmt: skip

    def plain(self, term: str, *zeros: str) -> tuple[ObjectiveOutput, BaseContext]:
        """The DDPM loss of this step alone, logged as ``term`` (``zeros``: the method's other
        terms, 0 here): what class-dependent methods fall back to on a dropped batch."""
        eps = self.predict()
        loss = mse(eps, self.noise)
        terms = {term: loss.detach(), **{z: torch.zeros((), device=loss.device) for z in zeros}}
        return ObjectiveOutput(loss, terms), self.context(eps)


Model = Callable[..., Tensor]
Aug = Tensor | None  # ADA's augmentation labels (B, augment_dim), or none
Result = tuple[ObjectiveOutput, BaseContext]


class ComposableObjective(Objective):
    """An objective that other objectives can wrap (CM, ADA, CORAL).

    A method implements :meth:`loss` on the step :meth:`compute` starts (a forward draw with
    CFG dropout, :class:`Step`); ``drops_labels = False`` for a method that trains the null
    label itself (IMBA). Calling the objective returns only the loss.
    """

    drops_labels = True

    def begin(
        self,
        model: Model,
        x0: Tensor,
        schedule: NoiseSchedule,
        y: Tensor,
        aug_labels: Tensor | None = None,
    ) -> Step:
        """Draw ``t``, the noise and ``x_t``, and apply CFG label dropout (not for methods that
        train the null label themselves)."""
        b = self.noised(x0, schedule)
        y_in, dropped = (y, False)
        if self.drops_labels:
            y_in, dropped = self.drop_condition(y, model.null_label)
        return Step(model, b.x_t, b.t, b.noise, y_in, dropped, aug_labels)

    def compute(
        self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Aug = None
    ) -> Result:
        """The loss and named terms, plus the :class:`BaseContext` of this step.

        ``aug_labels`` (B, augment_dim), when given, is passed to every model call (ADA).
        """
        return self.loss(self.begin(model, x0, schedule, y, aug_labels), x0, y, schedule)

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        """The method's loss on the step ``s`` (``x0``, ``y``: the clean batch)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Any:
        return self.compute(model, x0, y, schedule)[0]


class WrappingObjective(ComposableObjective):
    """A method that wraps a base objective (CM, ADA, CORAL, Group-Expert LoRA): label dropout
    is the base's, and the base is set up with the same class counts."""

    def __init__(self, base: ComposableObjective) -> None:
        super().__init__(cond_drop_prob=0.0, cond_drop_mode="none")
        if not isinstance(base, ComposableObjective):
            raise TypeError(
                f"{type(self).__name__} needs a composable base objective (DDPM, CBDM, OC, "
                f"...), got {type(base).__name__}"
            )
        self.base = base

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        super().setup(class_counts, seed)
        self.base.setup(class_counts, seed)
