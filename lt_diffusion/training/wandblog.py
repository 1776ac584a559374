"""A wandb logger whose lost service process ends the logging, not the training
(``logger=wandb``).

wandb logs through a service process of its own. SLURM stops every process of a job at once on
a requeue or a time limit (SIGTERM): wandb's service ends at once, while the training finishes
its step and saves it (:class:`lt_diffusion.training.callbacks.RunCheckpoint`). Lightning's
``WandbLogger`` then raises a ``ConnectionError`` when the step's metrics are logged, which
turned that clean stop into a failed run (without the step's checkpoint; in a table, a failure
record) and could leave the process hanging at exit. Here a lost service ends this process's
wandb logging with a warning; the training, its checkpoints and other loggers go on, and the
resumed run logs to the same wandb run again (:func:`lt_diffusion.training.run.build_logger`).
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn


class WandbLogger(LightningWandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger` (same arguments) that stops
    logging, with a warning, once wandb's service process is gone (images too: they are logged
    as metrics)."""

    service_lost: str | None = None  # why this process logs nothing more to wandb

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.service_lost is not None:
            return
        try:
            super().log_metrics(metrics, step)
        except ConnectionError as err:  # the service process ended (SLURM stops the job)
            self.service_lost = f"{type(err).__name__}: {err}"
            rank_zero_warn(
                f"wandb's service process is gone ({self.service_lost}), as when SLURM stops a "
                f"job: this process logs nothing more to wandb run {self.version} (from step "
                f"{step}); the training and its checkpoints go on, and a resumed run logs to "
                "the same wandb run again."
            )
