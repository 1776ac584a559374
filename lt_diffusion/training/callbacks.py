"""Callbacks: checkpoints (Lightning's ModelCheckpoint, atomic through the trainer's checkpoint
I/O), the run lock's guard on every write, and sample grids. ``configs/callbacks/`` builds them.
"""

from __future__ import annotations

import inspect
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image
from torchvision.utils import make_grid

from lt_diffusion.diffusion import generate, generate_vectors
from lt_diffusion.diffusion.generate import is_latent_model, is_vector_model
from lt_diffusion.utils.io import atomic_write_bytes
from lt_diffusion.utils.runlock import RunLockedError

# Interrupts leave the state between two steps, so it is safe (and wanted) to save then.
# Other exceptions (NaN, OOM, bugs) may leave bad weights: the last good checkpoint stays.
# (ModelCheckpoint's own save_on_exception saves on every exception.)
_SAVE_ON = (KeyboardInterrupt, SIGTERMException)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` for a run directory
    that is resumed in place.

    With ``final=True`` (the run's ``last.ckpt``) it also saves the current step when training
    ends and when it is interrupted (Ctrl-C, SIGTERM: SLURM requeue or time limit), unless
    that step is saved already. It needs ``every_n_train_steps >= 1``: a run killed hard
    (SIGKILL, a node lost) resumes from the latest periodic save. Every other argument is
    ModelCheckpoint's. The "directory not empty" warning is not given: resuming into the
    run's own checkpoint folder is the design.
    """

    def __init__(self, *, final: bool = False, **kwargs: Any) -> None:
        if final and int(kwargs.get("every_n_train_steps") or 0) < 1:
            raise ValueError(
                "train.ckpt_every (callbacks.checkpoint.every_n_train_steps) must be >= 1, got "
                f"{kwargs.get('every_n_train_steps')}: last.ckpt is written every that many steps"
            )
        super().__init__(**kwargs)
        self.final = final

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key is its period and monitor: last.ckpt and step files saved at
        # the same period would share it, and Lightning refuses two callbacks with one key.
        return f"{type(self).__name__}{{'filename': {self.filename!r}}}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def _save_current_step(self, trainer: L.Trainer) -> None:
        if self.final and not self._should_skip_saving_checkpoint(trainer):  # not saved yet
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_current_step(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, _SAVE_ON):
            self._save_current_step(trainer)


# ModelCheckpoint's arguments (keyword-only) and ``final``: what the config check
# (config_keys) and instantiate see, so that a misspelt argument is named before the run.
RunCheckpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        *(
            p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(ModelCheckpoint).parameters.values()
        ),
        inspect.Parameter("final", inspect.Parameter.KEYWORD_ONLY, default=False),
    ]
)


class RunLockGuard(L.Callback):
    """Asks the run lock before every checkpoint write: when another training has taken the
    run directory over (``lost_run_dir``, rank 0's
    :meth:`~lt_diffusion.utils.runlock.RunLock.lost`), every rank stops without writing.

    Lightning calls ``on_save_checkpoint`` on every rank after gathering the checkpoint and
    before the write, for every checkpoint callback (not for ``save_weights_only`` ones, which
    cannot resume a run anyway). Built by the run itself, never left out by a config.
    """

    def __init__(self, run_dir: str | Path, lost_run_dir: Callable[[], str | None] | None):
        self.run_dir = Path(run_dir)
        self.lost_run_dir = lost_run_dir

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        lost = self.lost_run_dir() if self.lost_run_dir is not None else None
        lost = trainer.strategy.broadcast(lost, src=0)  # every rank stops, or none
        if lost:
            raise RunLockedError(
                f"Stopping without writing to {self.run_dir}: {lost}. That training "
                "continues the run; this one is redundant."
            )


def scatter_png(points: Any, labels: Any) -> bytes:
    """A PNG of points ``(N, D)`` (first two coordinates) coloured by class label."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    try:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6)
        ax.set(xlim=(-1, 1), ylim=(-1, 1), aspect="equal", xlabel="x0", ylabel="x1")
        fig.colorbar(scatter, ax=ax, label="class")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end) draw a grid from the EMA model: one row per
    class, head (class 0) to tail, the same noise every time so grids are comparable. A model
    of vectors (the synthetic benchmark) gets a scatter plot of its points instead, coloured
    by class (the first two coordinates)."""

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
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.per_class, self.max_classes = per_class, max_classes  # a row per class
        self.steps, self.guidance, self.seed = steps, guidance, seed
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
        # DDIM for a diffusion model; a consistency model's own sampler (the objective knows).
        sampler = pl_module.objective.preview_sampler(
            pl_module.schedule, self.steps, not is_latent_model(model)
        )
        if is_vector_model(model):
            points = generate_vectors(
                model, sampler, labels, seed=self.seed, batch_size=256, guidance=self.guidance,
                device=pl_module.device,
            )  # fmt: skip
            self._save(trainer, scatter_png(points.numpy(), labels.numpy()), step)
            return
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
        image = Image.fromarray(grid.permute(1, 2, 0).numpy().squeeze())
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self._save(trainer, buf.getvalue(), step)

    def _save(self, trainer: L.Trainer, png: bytes, step: int) -> None:
        atomic_write_bytes(self.dirpath / f"grid_step{step:07d}.png", png)
        atomic_write_bytes(self.dirpath / "latest.png", png)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the grids as a slider over steps in wandb
                caption = f"step {step}: one row per class, class 0 (head) at the top"
                image = Image.open(io.BytesIO(png))
                logger.log_image("samples/grid", [image], step=step, caption=[caption])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module)
