"""An evaluation's results reach the wandb run that trained the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lt_diffusion.evaluation.tracking import log_to_training_run, tracked_values
from lt_diffusion.runs.load import wandb_run_id

RECORD = {
    "metrics": {
        "overall": {"fid": 12.5, "kid": 0.01, "n_generated": 100, "notes": ["n < d"]},
        "per_split": {"few": {"fid": 30.0, "is": None, "is_unavailable": "no logits"}},
        "per_class": {"class_000": {"fid": 50.0}},
    }
}
WANDB = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p", "offline": True}


def test_tracked_values_are_the_overall_and_split_metrics() -> None:
    # Counts, notes, unavailable values and per-class entries stay in the record only.
    assert tracked_values(RECORD, "quick") == {
        "eval/quick/overall/fid": 12.5,
        "eval/quick/overall/kid": 0.01,
        "eval/quick/few/fid": 30.0,
    }


def test_nothing_is_tracked_without_a_wandb_run(tmp_path: Path) -> None:
    assert wandb_run_id(tmp_path) is None
    assert log_to_training_run(tmp_path, OmegaConf.create(WANDB), "quick", RECORD, None) is None
    csv = OmegaConf.create({"_target_": "lightning.pytorch.loggers.CSVLogger"})
    assert log_to_training_run(tmp_path, csv, "quick", RECORD, None) is None
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow  # two offline wandb runs: their service takes seconds to start and stop
def test_the_plot_is_added_to_the_training_run(tmp_path: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = WandbLogger(project="p", save_dir=str(run_dir), offline=True, name="run")
    logger.log_metrics({"train/loss": 1.0}, step=1)
    trained = logger.experiment.id
    logger.experiment.finish()
    plt.plot([0, 1])
    plt.savefig(tmp_path / "plot.png")

    got = log_to_training_run(
        run_dir, OmegaConf.create(WANDB), "quick-x", RECORD, tmp_path / "plot.png"
    )
    assert got == trained
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{trained}"))
    assert len(runs) == 2  # the training's and the evaluation's part of the same run
    assert list((runs[1] / "files/media/images/eval/quick-x").glob("fid_vs_count_*.png"))
