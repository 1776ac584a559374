"""A resumed run is the run it continues, bit for bit on the CPU: every random state is in the
checkpoint. Also what a resume must not leave behind or lose: temporary files of killed writes,
the CSV history; and the runs that need no training at all (``max_steps`` reached or < 1)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lt_diffusion.runs.checkpoint import read_checkpoint
from lt_diffusion.training.rng import RNG_KEY
from tests.conftest import ROOT, compose_config, python_process

# Cheap runs: a batch of 4, a one-step grid of one image per class at the end.
FAST = ("data.batch_size=4", "train.grid_per_class=1", "train.grid_steps=1")


def _train(overrides: list[str], run_dir: Path) -> Path:
    from lt_diffusion import train

    train.run(compose_config("train", [*overrides, f"paths.run_dir={run_dir}"]))
    return run_dir / "checkpoints" / "last.ckpt"


def _same(a: object, b: object) -> bool:
    """Equal, tensors bit for bit, in nested dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def assert_same_training_state(a: Path, b: Path) -> None:
    """Weights, EMA, optimizer, schedule, step and random states are identical (bit for bit)."""
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    differ = [
        k for k in ca["state_dict"] if not torch.equal(ca["state_dict"][k], cb["state_dict"][k])
    ]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert len(ca["optimizer_states"]) == len(cb["optimizer_states"])
    for oa, ob in zip(ca["optimizer_states"], cb["optimizer_states"]):
        assert oa["state"].keys() == ob["state"].keys()  # one entry per trained parameter
        differ = [k for k in oa["state"] if not _same(oa["state"][k], ob["state"][k])]
        assert not differ, f"the optimizer state of {len(differ)} parameters differs"
        assert _same(oa["param_groups"], ob["param_groups"])
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    # The next step would draw the same numbers too, on every rank.
    assert len(ca[RNG_KEY]) == len(cb[RNG_KEY])
    for rank, (ra, rb) in enumerate(zip(ca[RNG_KEY], cb[RNG_KEY])):
        differ = [k for k in ra.keys() | rb.keys() if not _same(ra.get(k), rb.get(k))]
        assert not differ, f"rank {rank}'s random states differ: {sorted(differ)}"


@pytest.mark.parametrize(
    "method",
    [
        # DDPM with what draws randomness in a step: timesteps and noise (torch), the model's
        # dropout (torch), the batch-level CFG coin (the objective's host RNG; p = 0.5 so that
        # a replayed coin sequence shows), the batch stream (seeded per batch).
        ("method=ddpm", "model.dropout=0.3", "method.objective.cond_drop_prob=0.5"),
        # CBDM: also the regulariser's target labels y' (torch), per-sample label dropout.
        ("method=cbdm", "method.objective.cond_drop_prob=0.5"),
        pytest.param(
            ("method=cbdm", "method.objective.cond_drop_mode=sample"), marks=pytest.mark.slow
        ),
    ],
    ids=["ddpm-dropout", "cbdm-batch-coin", "cbdm-sample-drop"],
)
def test_resumed_run_equals_the_uninterrupted_run(train_overrides, tmp_path, method) -> None:
    # The resumed checkpoint is the periodic one written at a step's end (as after a kill).
    ov = (*FAST, *method, "train.ckpt_every=2")
    straight = _train(train_overrides(*ov, "train.max_steps=4"), tmp_path / "a")
    _train(train_overrides(*ov, "train.max_steps=2"), tmp_path / "b")
    resumed = _train(train_overrides(*ov, "train.max_steps=4"), tmp_path / "b")
    assert_same_training_state(straight, resumed)


def _metrics(run_dir: Path) -> tuple[list[str], list[int]]:
    path = run_dir / "logs" / "metrics.csv"
    lines = path.read_text().splitlines()
    steps = [int(float(r["step"])) for r in csv.DictReader(lines)]
    return lines, steps


def test_csv_log_keeps_its_history_across_resumes(train_overrides, tmp_path) -> None:
    run_dir = tmp_path / "r"
    ov = (*FAST, "logger=csv", "train.log_every=1", "train.ckpt_every=2")
    _train(train_overrides(*ov, "train.max_steps=4", "train.keep_every=2"), run_dir)
    _train(train_overrides(*ov, "train.max_steps=6"), run_dir)
    lines, steps = _metrics(run_dir)
    assert steps == list(range(6))
    assert lines.count(lines[0]) == 1  # one header

    # A killed run logged steps after its checkpoint: the resumed run logs them again, once.
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_0000002.ckpt").replace(ckpts / "last.ckpt")
    with open(run_dir / "logs" / "metrics.csv", "a") as f:
        f.write("0,0.5")  # and a row cut short by the kill
    _train(train_overrides(*ov, "train.max_steps=5"), run_dir)
    assert _metrics(run_dir)[1] == list(range(5))


def test_a_restarted_run_continues_its_wandb_run(tmp_path) -> None:
    """A run directory is one wandb run: a run started again (resumed, or restarted by a kill
    before its first checkpoint) logs to the id of the run folder an earlier attempt wrote
    (``wandb/latest-run``). End to end, with real processes and requeues: tests/test_slurm.py."""
    from lt_diffusion.training.run import build_logger

    cfg = compose_config("train", ["logger=wandb", f"paths.run_dir={tmp_path}"])
    assert build_logger(cfg, resume_step=0, run_dir=tmp_path)._wandb_init.get("id") is None
    (tmp_path / "wandb" / "offline-run-20260101_000000-k3x9q2ab").mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to("offline-run-20260101_000000-k3x9q2ab")
    for step in (4, 0):
        again = build_logger(cfg, resume_step=step, run_dir=tmp_path)
        assert again._wandb_init["id"] == "k3x9q2ab" and again._wandb_init["resume"] == "allow"
    mine = compose_config("train", ["logger=wandb", "+logger.id=mine", f"paths.run_dir={tmp_path}"])
    assert build_logger(mine, resume_step=4, run_dir=tmp_path)._wandb_init["id"] == "mine"


def test_a_lost_wandb_service_ends_the_logging_not_the_training(tmp_path) -> None:
    """SLURM's SIGTERM at a requeue ends wandb's service process with the training's: the
    step's metrics then meet a closed connection. The training must go on to save that step
    (tests/test_slurm.py has the real requeue)."""
    from lt_diffusion.training.wandblog import WandbLogger

    class Gone:  # a wandb run whose service process has ended
        id, calls = "k3x9q2ab", 0

        def log(self, *args: object, **kwargs: object) -> None:
            Gone.calls += 1
            raise ConnectionResetError("Connection lost")

    logger = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    logger._experiment = Gone()
    with pytest.warns(UserWarning, match=r"logs nothing more to wandb run k3x9q2ab \(from step 7"):
        logger.log_metrics({"train/loss": 0.5}, step=7)
    logger.log_metrics({"train/loss": 0.4}, step=8)  # not tried again, not raised
    assert Gone.calls == 1 and "ConnectionResetError" in logger.service_lost


def test_leftover_temporary_files_are_removed_at_start(train_overrides, tmp_path) -> None:
    """Every temporary file a training writes into its run directory (named by the atomic
    writers: ``.<target>.<8 characters>.tmp``) and a kill left behind is swept when the next
    training holds the lock; an evaluation's (records/, written without the lock) and
    wandb's are not, nor files that are not ours."""
    run_dir = tmp_path / "r"
    leftovers = [
        "checkpoints/.last.ckpt.k2j4_x9q.tmp",
        "checkpoints/.step_0000004.ckpt.a1b2c3d4.tmp",
        "export/.ema.safetensors.q1w2e3r4.tmp",
        "export/.config.yaml.zz99aa00.tmp",
        ".config.yaml.t5y6u7i8.tmp",
        ".train.lock.0f3e9a1c.tmp",
        ".hydra/.overrides.yaml.p0o9i8u7.tmp",
        "logs/.metrics.csv.m3n4b5v6.tmp",
        "samples/.latest.png.c7x8z9l0.tmp",
    ]
    kept = [
        "checkpoints/notes.tmp",
        "records/.quick-ddim20.json.g5h6j7k8.tmp",
        "wandb/.x.y.abcdefgh.tmp",
    ]
    for name in (*leftovers, *kept):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(b"\0" * 100)
    _train(train_overrides(*FAST, "train.max_steps=1"), run_dir)
    assert [n for n in leftovers if (run_dir / n).exists()] == []
    assert all((run_dir / n).exists() for n in kept)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "notes.tmp"]


def test_max_steps_below_one_is_refused_before_any_work(train_overrides, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"train.max_steps=0: a run needs at least one step"):
        _train(train_overrides("train.max_steps=0"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@contextlib.contextmanager
def _lightning_messages() -> Iterator[io.StringIO]:
    """What the run reports through Lightning's logger (rank_zero_info)."""
    stream, logger = io.StringIO(), logging.getLogger("lightning.pytorch")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_a_complete_run_says_so_and_names_its_checkpoint(train_overrides, tmp_path) -> None:
    run_dir = tmp_path / "r"
    last = _train(train_overrides(*FAST, "train.max_steps=2"), run_dir)
    before = last.stat().st_mtime_ns
    for steps in (2, 1, 0):
        with _lightning_messages() as out:
            _train(train_overrides(*FAST, f"train.max_steps={steps}"), run_dir)
        assert f"Run already complete at step 2: {last}" in out.getvalue()
    assert last.stat().st_mtime_ns == before  # nothing trained, nothing rewritten


# --- kill -9 at random moments, restart, until done ------------------------------------------


def _step(last: Path) -> int:
    return int(read_checkpoint(last)["global_step"]) if last.exists() else 0


@pytest.mark.slow
def test_kill_loop_ends_with_the_uninterrupted_runs_weights(train_overrides, tmp_path) -> None:
    """SIGKILL at random moments of training and while a checkpoint is being written; the same
    command restarted each time (taking over the dead process's lock, sweeping its temporary
    file); the final state equals an uninterrupted run's."""
    steps = 24
    ov = train_overrides(
        *FAST,
        f"train.max_steps={steps}",
        "train.ckpt_every=2",
        "train.log_every=1",
        "model.dropout=0.3",
        "method.objective.cond_drop_prob=0.5",
    )
    ref = python_process(["-m", "lt_diffusion.train", *ov, f"paths.run_dir={tmp_path / 'ref'}"])
    assert ref.wait(timeout=900) == 0, ref.stdout.read()

    run_dir = tmp_path / "killed"
    ckpts, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    kills = mid_write = 0
    for attempt in range(12):
        proc = python_process(["-m", "lt_diffusion.train", *ov, f"paths.run_dir={run_dir}"])
        start_step, deadline = _step(last), time.time() + 600
        if attempt < 8:
            # Odd attempts: the moment a checkpoint write is under way; even: a random moment
            # after the run made progress.
            if attempt % 2:
                while proc.poll() is None and time.time() < deadline:
                    if any(p.name.startswith(".last.ckpt.") for p in ckpts.glob("*.tmp")):
                        mid_write += 1
                        break
                    time.sleep(0.002)
            else:
                while proc.poll() is None and _step(last) <= start_step and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 3.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        log = proc.communicate(timeout=900)[0]
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, log
    else:
        pytest.fail("the run did not finish after 12 starts")

    assert kills >= 4 and mid_write >= 1, (kills, mid_write)
    assert_same_training_state(tmp_path / "ref" / "checkpoints" / "last.ckpt", last)
    assert not list(ckpts.glob("*.tmp")) and not (run_dir / "train.lock").exists()
    _, logged = _metrics(run_dir)
    assert len(set(logged)) == len(logged) and logged == sorted(logged)


@pytest.mark.slow
def test_ddp_resume_is_exact_with_each_ranks_own_random_states(train_overrides, tmp_path) -> None:
    """Two CPU processes (gloo): each rank draws its own random numbers, rank 0's checkpoint
    holds both ranks' states, and each rank restores its own; only rank 0 holds the lock."""
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true")
    ov = train_overrides(*FAST, *ddp, "model.dropout=0.3", "method.objective.cond_drop_prob=0.5")
    ov.append("train.ckpt_every=2")

    def train(run_dir: Path, steps: int) -> None:
        proc = python_process(
            [
                "-m",
                "lt_diffusion.train",
                *ov,
                f"train.max_steps={steps}",
                f"hydra.run.dir={run_dir}",
            ]
        )
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log
        assert not (run_dir / "train.lock").exists()

    train(tmp_path / "a", 4)
    train(tmp_path / "b", 2)
    train(tmp_path / "b", 4)
    a, b = (
        tmp_path / "a" / "checkpoints" / "last.ckpt",
        tmp_path / "b" / "checkpoints" / "last.ckpt",
    )
    assert_same_training_state(a, b)
    states = read_checkpoint(a)[RNG_KEY]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


# --- kill -9 of one rank of a two-process run, restart, until done -----------------------------

DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true")


def _start_job(args: list[str], log: Path) -> subprocess.Popen:
    """``python <args>`` as a user starts it, its output (both ranks') appended to ``log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _other_ranks(pid: int) -> list[int]:
    """The training processes ``pid`` started (Lightning's launcher starts rank 1 as its
    child; not a passing ``git describe``)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    ranks = []
    for kid in kids:
        with contextlib.suppress(OSError):
            if b"lt_diffusion.train" in Path(f"/proc/{kid}/cmdline").read_bytes():
                ranks.append(kid)
    return ranks


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_ddp_kill_loop_ends_with_the_uninterrupted_runs_state(train_overrides, tmp_path) -> None:
    """Two CPU processes (gloo: the code path of NCCL ranks). SIGKILL of one rank at random
    moments, of rank 0 while it writes a checkpoint too; the job then dies as a whole (when a
    rank dies Lightning's launcher kills the others; a rank left waiting is killed as a
    scheduler ends a job) and the same command starts it again, taking over the dead rank 0's
    lock and sweeping its temporary file. The final state (every tensor of the weights, EMA,
    optimizer; both ranks' random states) equals the uninterrupted two-process run's; a run
    of another seed does not."""
    steps = 24
    ov = train_overrides(
        *FAST,
        *DDP,
        f"train.max_steps={steps}",
        "train.ckpt_every=2",
        "train.log_every=1",
        "model.dropout=0.3",
        "method.objective.cond_drop_prob=0.5",
    )
    log = tmp_path / "jobs.log"

    def job(run_dir: Path, *extra: str) -> subprocess.Popen:
        return _start_job(
            ["-m", "lt_diffusion.train", *ov, *extra, f"hydra.run.dir={run_dir}"], log
        )

    started = time.monotonic()
    for proc in [job(tmp_path / "ref"), job(tmp_path / "seed1", "seed=1")]:
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]

    run_dir = tmp_path / "killed"
    ckpts, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    killed, mid_write, torn_down = [], 0, 0
    for attempt in range(14):
        proc, kills_before = job(run_dir), len(killed)
        start_step, deadline = _step(last), time.time() + 600
        if attempt < 8:
            if attempt % 2:  # rank 0 while a checkpoint write is under way
                rank = 0
                while proc.poll() is None and time.time() < deadline:
                    if any(p.name.startswith(".last.ckpt.") for p in ckpts.glob("*.tmp")):
                        mid_write += 1
                        break
                    time.sleep(0.002)
            else:  # rank 0 or rank 1 at a random moment after the run made progress
                rank = (attempt // 2) % 2
                while proc.poll() is None and _step(last) <= start_step and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 3.0))
            ranks = [proc.pid, *_other_ranks(proc.pid)]
            if proc.poll() is None and len(ranks) == 2:
                os.kill(ranks[rank], signal.SIGKILL)
                killed.append(rank)
                # The job ends as a whole: the other rank stops (gloo loses its peer, or
                # Lightning kills it), or is killed after 30 s, as a scheduler would.
                end = time.time() + 30
                while any(_running(p) for p in ranks) and time.time() < end:
                    time.sleep(0.2)
                for p in ranks:
                    if _running(p):
                        os.kill(p, signal.SIGKILL)
                        torn_down += 1
        proc.wait(timeout=900)
        if proc.returncode == 0:
            break
        # Killed, or rank 0 stopped by gloo's error when its peer died: nothing else fails.
        assert len(killed) == kills_before + 1, log.read_text()[-4000:]
    else:
        pytest.fail("the run did not finish after 14 starts")
    print(
        f"{len(killed)} kills (ranks {killed}), {mid_write} during a checkpoint write, "
        f"{torn_down} ranks left waiting and killed, {attempt + 1} starts, "
        f"{time.monotonic() - started:.0f} s in all"
    )

    assert len(killed) >= 6 and 1 in killed and mid_write >= 1, (killed, mid_write)
    reference = tmp_path / "ref" / "checkpoints" / "last.ckpt"
    assert_same_training_state(reference, last)
    states = read_checkpoint(last)[RNG_KEY]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_training_state(reference, tmp_path / "seed1" / "checkpoints" / "last.ckpt")
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "train.lock").exists()
    _, logged = _metrics(run_dir)
    assert len(set(logged)) == len(logged) and logged == sorted(logged)
