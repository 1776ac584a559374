"""One LightningModule for every method: the objective is a pluggable part (DESIGN.md step 4).

Nothing here is method-specific. Speed: the live backbone can run under ``torch.compile`` and
channels-last; the training step never synchronises with the host (logging is of tensors and
the progress bar refreshes every ``log_every`` steps).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods import Objective
from lt_diffusion.training.checkpoint import META_KEY
from lt_diffusion.training.ema import ema_update


class LinearWarmup:
    """LR multiplier rising linearly from 1/warmup to 1 over ``warmup`` steps (picklable)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = max(0, int(warmup))

    def __call__(self, step: int) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, (step + 1) / self.warmup)


class DiffusionModule(L.LightningModule):
    """Trains ``model`` with ``objective`` under ``schedule``; keeps an EMA copy for sampling.

    Args:
        model: backbone mapping ``(x_t, t, y) -> eps``.
        objective: the method (loss) to optimise.
        schedule: the forward noise schedule.
        optimizer: a partial optimizer constructor taking the parameters.
        warmup_steps: linear learning-rate warm-up.
        ema_decay: EMA decay per step.
        compile_model: run the live backbone under ``torch.compile``.
        channels_last: keep weights and batches in channels-last memory format.
        meta: stored in every checkpoint (resolved config, dataset description).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        schedule: NoiseSchedule,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        compile_model: bool = False,
        channels_last: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {ema_decay}")
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.objective = objective
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.compile_model = compile_model
        self.channels_last = channels_last
        self.meta = meta or {}
        self._net: Callable[..., Tensor] = model

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.ema_model.to(memory_format=torch.channels_last)
        # The compiled wrapper is kept out of the module tree so checkpoints hold plain keys.
        net = torch.compile(self.model) if self.compile_model else self.model
        object.__setattr__(self, "_net", net)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.objective(self._net, x, y, self.schedule)
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.terms.items():
            self.log(f"train/{name}", value)
        return out.loss

    def on_train_batch_end(self, *args: Any) -> None:
        ema_update(self.ema_model, self.model, self.ema_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in self.objective.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        scheduler = LambdaLR(optimizer, LinearWarmup(self.warmup_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.meta
