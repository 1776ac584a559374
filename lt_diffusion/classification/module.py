"""The classifier's LightningModule: a loss on a model, the epoch-wise learning-rate schedule of
the CIFAR-LT recipe, and CM's capacity-manipulation term when the model's convolutions carry
reserved low-rank capacity.

The training stream is endless (as the diffusion runs'), so epochs are counted in steps:
``epoch = step // steps_per_epoch`` with ``steps_per_epoch = ceil(N / global batch)``. The
learning rate at epoch ``e`` (Cao et al. 2019, their ``adjust_learning_rate``): ``lr (e + 1) /
warmup`` during the first ``warmup`` epochs, then ``lr * gamma^k`` with ``k`` the number of
milestones ``<= e`` (160 and 180 of 200, ``gamma = 0.01``).

CM for a classifier (the CM paper, Sec. G.11 applies eq. 1's decomposition to the
convolutions; eqs. 2-4 carried over with the logits in place of the predicted noise)::

    d    = ||z_theta(x) - z_theta_g(x)||^2     (mean over the C logits, per sample)
    L_CM = mean_batch((w_con(y) - w_div(y)) d),  L = L_loss + lam L_CM

with eq. 3's weights from the training counts (:func:`lt_diffusion.methods.cm.cm_class_weights`).
The ``theta_g`` forward runs the same batch with the ``B A`` parts switched off and BatchNorm's
running statistics frozen (they describe the full model the classifier is evaluated as).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lt_diffusion.classification.losses import ClassificationLoss
from lt_diffusion.methods.base import mse
from lt_diffusion.methods.cm import cm_class_weights
from lt_diffusion.models.lowrank import expert_switch
from lt_diffusion.runs.checkpoint import META_KEY
from lt_diffusion.training.module import stepwise_optimizer


class EpochSchedule:
    """LR multiplier of a step: linear warm-up over epochs, then step decay (picklable)."""

    def __init__(
        self, steps_per_epoch: int, warmup_epochs: int, milestones: Sequence[int], gamma: float
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)

    def epoch(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def __call__(self, step: int) -> float:
        e = self.epoch(step)
        if e < self.warmup_epochs:
            return (e + 1) / self.warmup_epochs
        return self.gamma ** sum(e >= m for m in self.milestones)


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by the batch but leave their running statistics as they are
    (momentum 0 for the block)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [m.momentum for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum in zip(norms, before):
            m.momentum = momentum


class ClassifierModule(L.LightningModule):
    """Trains ``model`` with ``loss`` (and CM's term when ``cm_lam > 0``).

    Args:
        model: images -> logits.
        loss: a :class:`ClassificationLoss` already set up with the training counts.
        optimizer: a partial optimizer constructor taking the parameters.
        schedule: the learning-rate multiplier per step (and the epoch of a step).
        class_counts: training images per class (CM's eq. 3 weights).
        cm_lam: weight of ``L_CM`` (0: none).
        cm_con / cm_div: keep the consistency / diversity term.
        meta: stored in every checkpoint (resolved config, dataset description).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: ClassificationLoss,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        schedule: EpochSchedule,
        class_counts: Sequence[int],
        cm_lam: float = 0.0,
        cm_con: bool = True,
        cm_div: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if cm_lam < 0:
            raise ValueError(f"capacity.lam must be >= 0, got {cm_lam}")
        self.model, self.loss = model, loss
        self.optimizer_factory, self.schedule = optimizer, schedule
        self.cm_lam, self.cm_con, self.cm_div = float(cm_lam), bool(cm_con), bool(cm_div)
        self.meta = meta or {}
        w_con, w_div = cm_class_weights(class_counts)
        self.register_buffer("w_con", w_con.float(), persistent=False)
        self.register_buffer("w_div", w_div.float(), persistent=False)
        if self.cm_lam > 0 and not any(hasattr(m, "expert_enabled") for m in model.modules()):
            raise ValueError(
                "capacity.lam > 0 but the model has no reserved low-rank capacity: use "
                "capacity=cm (its transform decomposes the convolutions)"
            )

    def cm_loss(self, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        """``L_CM`` of the batch (module docstring); gradients flow through both branches."""
        with expert_switch(self.model, False), frozen_batchnorm_statistics(self.model):
            logits_g = self.model(x)
        d = mse(logits, logits_g, per_sample=True)
        weight = torch.zeros_like(d)
        if self.cm_con:
            weight = weight + self.w_con[y].to(d.dtype)
        if self.cm_div:
            weight = weight - self.w_div[y].to(d.dtype)
        return (weight * d).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        epoch = self.schedule.epoch(self.global_step)
        loss = self.loss(logits, y, epoch)
        self.log("train/ce", loss.detach())
        if self.cm_lam > 0:
            cm = self.cm_loss(x, y, logits)
            self.log("train/cm", cm.detach())
            loss = loss + self.cm_lam * cm
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/epoch", float(epoch))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return stepwise_optimizer(self.optimizer_factory, (self.model,), self.schedule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.meta
