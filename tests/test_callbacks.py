"""The training's callbacks come from the ``callbacks`` config group: Lightning's ModelCheckpoint
(``last.ckpt`` every ``train.ckpt_every`` steps, at the end and on SIGTERM; permanent step files
every ``train.keep_every``), the sample grid and the progress bar; each can be changed or left
out from the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

from lt_diffusion.runs.checkpoint import read_checkpoint
from tests.conftest import compose_config, python_process
from tests.test_resume import FAST, assert_same_training_state


def _train(overrides: list[str], run_dir: Path) -> Path:
    from lt_diffusion import train

    return train.run(compose_config("train", [*overrides, f"paths.run_dir={run_dir}"]))


def _step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"])


def test_periodic_kept_and_final_checkpoints(train_overrides, tmp_path) -> None:
    ov = train_overrides(*FAST, "train.max_steps=7", "train.ckpt_every=2", "train.keep_every=3")
    run_dir = _train([*ov, "train.grid_every=4"], tmp_path / "r")
    ckpts = run_dir / "checkpoints"
    # 7 is no multiple of 2: the end of training saves it; step files at 3 and 6 stay.
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step_0000003.ckpt",
        "step_0000006.ckpt",
    ]
    assert [_step(ckpts / n) for n in ("last.ckpt", "step_0000003.ckpt")] == [7, 3]
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["grid_step0000004.png", "grid_step0000007.png", "latest.png"]


def test_one_callback_changed_or_left_out_from_the_command_line(train_overrides, tmp_path) -> None:
    ov = train_overrides(*FAST, "train.max_steps=3", "train.ckpt_every=100")
    run_dir = _train(
        [*ov, "callbacks.kept_checkpoints.every_n_train_steps=1", "callbacks.sample_grid=null"],
        tmp_path / "r",
    )
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt", *(f"step_000000{k}.ckpt" for k in (1, 2, 3))]
    assert not (run_dir / "samples").exists()


def test_no_callbacks_writes_nothing(train_overrides, tmp_path) -> None:
    # Without a checkpoint callback Lightning would add its own (every epoch): it must not.
    run_dir = _train(train_overrides(*FAST, "train.max_steps=12", "callbacks=none"), tmp_path / "r")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "samples").exists()


def test_a_bad_checkpoint_period_is_refused_before_the_data_is_read(
    train_overrides, tmp_path
) -> None:
    ov = train_overrides("train.max_steps=3", "train.ckpt_every=0", "paths.data_root=/nowhere")
    with pytest.raises(Exception, match=r"train.ckpt_every \(callbacks.checkpoint.every_n_train"):
        _train(ov, tmp_path / "r")
    typo = train_overrides("+callbacks.checkpoint.every_n_train_step=3")
    with pytest.raises(ValueError, match="did you mean callbacks.checkpoint.every_n_train_steps"):
        _train(typo, tmp_path / "r")


class RaiseAt(L.Callback):
    """Raises ``error`` (a class name) when step ``step`` ends."""

    def __init__(self, step: int, error: str) -> None:
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise {"SIGTERMException": SIGTERMException, "ValueError": ValueError}[self.error]()


@pytest.mark.parametrize("error,saved", [("SIGTERMException", 5), ("ValueError", 4)])
def test_an_interrupt_saves_the_current_step_an_error_does_not(
    train_overrides, tmp_path, error: str, saved: int
) -> None:
    # A failing step (NaN, OOM, a bug) may leave bad weights: the last good checkpoint stays.
    ov = train_overrides(
        *FAST, "train.max_steps=9", "train.ckpt_every=4", "callbacks.sample_grid=null"
    )
    ov += [f"+callbacks.stop._target_={__name__}.RaiseAt", "+callbacks.stop.step=5"]
    with pytest.raises(SIGTERMException if error == "SIGTERMException" else ValueError):
        _train([*ov, f"+callbacks.stop.error={error}"], tmp_path / "r")
    assert _step(tmp_path / "r" / "checkpoints" / "last.ckpt") == saved


class TermThenLoseService(L.Callback):
    """When step ``step`` ends: SIGTERM to this process, as SLURM stops a job, and the error
    of a helper process the signal ended too (wandb's service)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it
            raise ConnectionResetError("Connection lost")


def test_an_error_after_sigterm_ends_the_run_as_the_sigterm(train_overrides, tmp_path) -> None:
    # SLURM signals every process of a job: a helper's error after the SIGTERM is part of the
    # stop (submitit must not record a failure for a job being requeued). The same error
    # without a SIGTERM is a failure (ValueError above).
    ov = train_overrides(
        *FAST, "train.max_steps=9", "train.ckpt_every=2", "callbacks.sample_grid=null"
    )
    ov += [f"+callbacks.lost._target_={__name__}.TermThenLoseService", "+callbacks.lost.step=3"]
    with pytest.raises(SIGTERMException) as err:
        _train(ov, tmp_path / "r")
    assert isinstance(err.value.__cause__, ConnectionResetError)
    assert _step(tmp_path / "r" / "checkpoints" / "last.ckpt") == 2  # not a clean stop: no save


class TimeLimitSignal(L.Callback):
    """In the middle of step ``step`` (before its optimizer step): the signal SLURM sends
    ``signal_delay_s`` before a job's time limit (USR2 for hydra/launcher=slurm)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR2)


class CheckpointableJob:  # what submitit runs: checkpointable, as hydra's launcher's job is
    def __call__(self) -> None:
        pass

    def checkpoint(self) -> object:
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(self)


@pytest.mark.parametrize(
    "requeue",
    ["requeued", pytest.param("scontrol stopped by the SIGTERM", marks=pytest.mark.slow)],
)
def test_a_time_limit_stops_the_training_at_the_end_of_the_step_saved(
    train_overrides, tmp_path, requeue: str
) -> None:
    """submitit's own handler of the time-limit signal (the real one) requeues the job and
    exits on the spot, mid-step: the step reached would be lost, and a CSV row with it when
    the exit falls after a periodic checkpoint. During training the exit is left out: the
    SIGTERM that SLURM sends for the requeue ends the run at the end of the step, saved."""
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission

    class Slurm:  # scontrol requeue: SLURM signals the job's processes (SIGTERM)
        global_rank = 0

        def _requeue(self, countdown: int) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            if requeue != "requeued":
                raise subprocess.CalledProcessError(-15, ["scontrol", "requeue", "7"])

    job = DelayedSubmission(CheckpointableJob())
    job.set_timeout(1, 3)  # one minute: timed out (submitit checkpoints, then requeues)
    submitit_handler = SignalHandler(
        Slurm(), type("Paths", (), {"submitted_pickle": tmp_path / "job.pkl"})(), job
    ).checkpoint_and_try_requeue
    ov = train_overrides(
        *FAST, "train.max_steps=9", "train.ckpt_every=2", "train.log_every=1",
        "callbacks.sample_grid=null", f"+callbacks.limit._target_={__name__}.TimeLimitSignal",
        "+callbacks.limit.step=4",
    )  # fmt: skip
    before = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SIGTERMException):  # not submitit's SystemExit(-1)
            _train(ov, tmp_path / "r")
        assert signal.getsignal(signal.SIGUSR2) == submitit_handler  # put back after fit
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert (tmp_path / "job.pkl").is_file()  # submitit's checkpoint of the job was written
    assert _step(tmp_path / "r" / "checkpoints" / "last.ckpt") == 5  # the step it was in, done
    rows = (tmp_path / "r" / "logs" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[1]) for r in rows] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_resume_is_exact(train_overrides, tmp_path) -> None:
    """SLURM's requeue and time limit send SIGTERM: the step reached is saved (no periodic save
    is near), and resuming from it gives the uninterrupted run's state, bit for bit."""
    ov = train_overrides(
        *FAST, "train.ckpt_every=100000", "logger=csv", "train.log_every=1", "model.dropout=0.3"
    )
    run_dir = tmp_path / "killed"
    cmd = ["-m", "lt_diffusion.train", *ov, f"paths.run_dir={run_dir}"]
    proc = python_process([*cmd, "train.max_steps=100000"])
    metrics, deadline = run_dir / "logs" / "metrics.csv", time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 4):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), log
    stopped = _step(last)
    assert 3 <= stopped < 100000, log

    target = f"train.max_steps={stopped + 2}"
    _train([*ov, target], run_dir)
    straight = _train([*ov, target], tmp_path / "straight")
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", last)


def test_sample_grids_are_logged_to_wandb(train_overrides, tmp_path) -> None:
    ov = train_overrides(*FAST, "logger=wandb", "train.max_steps=3", "train.grid_every=2")
    run_dir = _train(ov, tmp_path / "r")  # wandb offline (tests/conftest.py)
    logged = sorted(run_dir.glob("wandb/offline-run-*/files/media/images/samples/grid_*.png"))
    assert len(logged) == 2  # step 2 and the end (step 3)
    drawn = Image.open(run_dir / "samples" / "grid_step0000003.png")
    assert Image.open(logged[-1]).size == drawn.size
