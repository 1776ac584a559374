"""Callbacks: periodic (atomic) checkpoints and sample grids."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image
from torchvision.utils import make_grid

from lt_diffusion.diffusion import DDIMSampler, generate
from lt_diffusion.diffusion.generate import is_latent_model
from lt_diffusion.training.checkpoint import LAST
from lt_diffusion.utils.io import atomic_write_bytes
from lt_diffusion.utils.runlock import RunLockedError

# Interrupts leave the state between two steps, so it is safe (and wanted) to save then.
# Other exceptions (NaN, OOM, bugs) may leave bad weights: the last good checkpoint stays.
_SAVE_ON = (KeyboardInterrupt, SIGTERMException)


class PeriodicCheckpoint(L.Callback):
    """Write ``last.ckpt`` every ``every_n_steps``, at the end, and when interrupted.

    With ``keep_every_n_steps`` a permanent ``step_XXXXXXX.ckpt`` is also kept at that period.
    Writes go through the trainer's (atomic) checkpoint I/O. ``lost_run_dir`` (rank 0: the run
    lock's :meth:`~lt_diffusion.utils.runlock.RunLock.lost`) is asked before every write; when
    another training has taken the run directory over, every rank stops without writing.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int,
        keep_every_n_steps: int = 0,
        lost_run_dir: Callable[[], str | None] | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"train.ckpt_every must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_every_n_steps = keep_every_n_steps
        self.lost_run_dir = lost_run_dir
        self._saved_step = -1

    def _check_owner(self, trainer: L.Trainer) -> None:
        lost = self.lost_run_dir() if self.lost_run_dir is not None else None
        lost = trainer.strategy.broadcast(lost, src=0)  # every rank stops, or none
        if lost:
            raise RunLockedError(
                f"Stopping without writing to {self.dirpath.parent}: {lost}. That training "
                "continues the run; this one is redundant."
            )

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._saved_step:
            return
        self._check_owner(trainer)
        trainer.save_checkpoint(self.dirpath / LAST)
        if self.keep_every_n_steps and step % self.keep_every_n_steps == 0:
            trainer.save_checkpoint(self.dirpath / f"step_{step:07d}.ckpt")
        self._saved_step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, _SAVE_ON) and trainer.global_step > 0:
            self._save(trainer)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end) draw a grid from the EMA model: one row per
    class, head (class 0) to tail, the same noise every time so grids are comparable."""

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int,
        per_class: int = 8,
        steps: int = 50,
        guidance: float = 0.0,
        seed: int = 0,
        max_classes: int = 20,
    ):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.max_classes = max_classes
        self._done_step = -1

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._done_step:
            return
        self._done_step = step
        if not trainer.is_global_zero:
            return
        model = pl_module.ema_model
        classes = min(model.num_classes, self.max_classes)
        labels = torch.arange(classes).repeat_interleave(self.per_class)
        # x0 clipped to the pixel range: early checkpoints overshoot it far from the data,
        # and unclipped DDIM then diverges into noise (latents have no fixed range).
        sampler = DDIMSampler(
            pl_module.schedule, steps=self.steps, clip_denoised=not is_latent_model(model)
        )
        shape = (model.in_channels, model.image_size, model.image_size)
        images = generate(
            model,
            sampler,
            labels,
            seed=self.seed,
            batch_size=256,
            image_shape=shape,
            guidance=self.guidance,
            device=pl_module.device,
        )
        grid = make_grid(images.cpu(), nrow=self.per_class, padding=1, pad_value=255)
        buf = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).numpy().squeeze()).save(buf, format="PNG")
        data = buf.getvalue()
        atomic_write_bytes(self.dirpath / f"grid_step{step:07d}.png", data)
        atomic_write_bytes(self.dirpath / "latest.png", data)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module)
