"""An evaluation's numbers and its per-class FID plot in the Weights & Biases run that trained
the checkpoint, so that a run's page holds its losses, its sample grids and its results.

Evaluations run after training's wandb run has closed (``ltd-evaluate``, a table's jobs), so the
run is resumed by its id, read from the folder Lightning's ``WandbLogger`` wrote
(``<run_dir>/wandb/latest-run`` -> ``offline-run-<time>-<id>``), in the mode it trained in.
The record is written before: a tracking failure costs the wandb entry only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lt_diffusion.evaluation.metrics import METRICS
from lt_diffusion.runs.load import wandb_run_id


def tracked_values(record: dict[str, Any], name: str) -> dict[str, float]:
    """The record's overall and per-split metric values as ``eval/<name>/<where>/<metric>``."""
    metrics = record["metrics"]
    entries = [("overall", metrics.get("overall") or {}), *metrics["per_split"].items()]
    return {
        f"eval/{name}/{where}/{metric}": float(value)
        for where, entry in entries
        for metric, value in entry.items()
        if metric in METRICS and isinstance(value, int | float)
    }


def log_to_training_run(
    run_dir: Path, logger: Any, name: str, record: dict[str, Any], plot: Path | None
) -> str | None:
    """Add the evaluation ``name`` (the record's file stem) to the run's wandb run when it
    trained with ``logger=wandb``; returns the run id it logged to, or None."""
    if logger is None or "WandbLogger" not in str(logger.get("_target_", "")):
        return None
    run_id = wandb_run_id(run_dir)
    if run_id is None:
        return None
    import wandb

    run = wandb.init(
        project=logger.get("project"),
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode="offline" if logger.get("offline", True) else "online",
        settings=wandb.Settings(silent=True),
    )
    try:
        values: dict[str, Any] = tracked_values(record, name)
        if plot is not None:
            values[f"eval/{name}/fid_vs_count"] = wandb.Image(str(plot))
        run.log(values)
        run.summary.update({k: v for k, v in values.items() if isinstance(v, float)})
    finally:
        run.finish()
    return run_id
