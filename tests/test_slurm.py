"""A tiny table on a real one-node SLURM cluster (Debian's slurm-wlm, started here and stopped
by process id): submitted through hydra-submitit-launcher, one job requeued mid-training with
``scontrol requeue`` resumes from its checkpoint, and the table renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lt_diffusion.runs.checkpoint import read_checkpoint
from tests.conftest import ROOT
from tests.slurm_cluster import LocalSlurm, unavailable_reason
from tests.tables_fixture import TINY_EVAL, tiny_table_overrides, write_tiny_table
from tests.test_resume import assert_same_training_state

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]


@pytest.fixture(scope="module")
def slurm() -> Iterator[LocalSlurm]:
    # Under /tmp with mode 755: munged runs as user munge and must reach its socket folder.
    base = Path(tempfile.mkdtemp(prefix="lt-slurm-"))
    base.chmod(0o755)
    cluster = LocalSlurm(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _step(ckpt: Path) -> int:
    try:
        return int(read_checkpoint(ckpt)["global_step"])
    except Exception:  # being replaced right now: try again
        return -1


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the table command ended (code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_table_on_slurm_with_a_requeued_job(
    slurm: LocalSlurm, tiny_cifar: Path, tmp_path: Path
) -> None:
    configs = write_tiny_table(tmp_path / "configs")  # DDPM and CBDM rows, seed 0
    out = tmp_path / "outputs"
    long_steps = 150
    cmd = [
        sys.executable, "-m", "lt_diffusion.table", "table=tiny",
        f"hydra.searchpath=[file://{configs}]",
        f"paths.output_dir={out}",
        "hydra/launcher=slurm", "hydra.launcher.timeout_min=20",
        "hydra.launcher.array_parallelism=1",  # one job at a time on the two cores
        *tiny_table_overrides(tiny_cifar, f"train.max_steps={long_steps}", "train.ckpt_every=10"),
        f"eval_overrides=[{','.join(json.dumps(o) for o in TINY_EVAL)}]",
    ]  # fmt: skip
    log = open(tmp_path / "table.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=slurm.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The first job (array task 0) trains: requeue it once it has a checkpoint.
        first = out / "runs" / "cifar10_lt-ir10-ddpm-seed0" / "checkpoints" / "last.ckpt"
        _wait(lambda: first.is_file() and _step(first) >= 10, 300, "a first checkpoint", proc)
        jobs = slurm.run("squeue", "-h", "-t", "RUNNING", "-o", "%i").split()
        assert len(jobs) == 1, jobs
        slurm.run("scontrol", "requeue", jobs[0])
        step_at_requeue = _step(first)
        assert step_at_requeue < long_steps, "training ended before the requeue: raise max_steps"
        # A requeued job waits ~2 minutes before it may start again: release it now.
        _wait(lambda: "PENDING" in slurm.run("squeue", "-h", "-j", jobs[0], "-o", "%T"), 60,
              "the requeued job to be pending", proc)  # fmt: skip
        slurm.run("scontrol", "update", f"JobId={jobs[0]}", "StartTime=now")
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "table.log").read_text()
    assert proc.returncode == 0, text[-4000:]

    # The requeued run resumed from its checkpoint, not from step 0, and finished.
    submitit = next(out.glob("sweeps/tiny/*/.submitit"))
    job_log = "".join(p.read_text() for p in submitit.glob("*/*_0_log.*"))
    resumed = [int(s) for s in re.findall(r"Resuming from \S+ at step (\d+)", job_log)]
    assert resumed and 0 < resumed[0] <= long_steps, job_log[-3000:]
    assert _step(first) == long_steps

    # Every run has its record and the table shows a number in every cell.
    records = sorted(out.glob("runs/*/records/*.json"))
    assert len(records) == 2
    table = (out / "tables" / "tiny.md").read_text()
    assert "pending" not in table and "failed" not in table, table
    ours = [json.loads(r.read_text())["metrics"]["overall"]["fid"] for r in records]
    assert all(f"{v:.2f}" in table for v in ours), table


# --- requeue and time limit of a training job: exact, same wandb run, same CSV log ------------

# A training of ~1 minute on one CPU thread (thread counts change CPU rounding): every step
# draws from every random state (dropout, the CFG coin), a checkpoint every 3 steps.
STEPS = 60
TRAIN = [
    "dataset=cifar10_lt", "imbalance=ir10", "model=unet_tiny", "trainer=cpu",
    "dataset.source.download=false", "data.batch_size=4", "train.warmup_steps=2",
    f"train.max_steps={STEPS}", "train.ckpt_every=3", "train.log_every=1", "train.grid_every=0",
    "train.grid_per_class=1", "train.grid_steps=1", "train.threads=1", "model.dropout=0.3",
    "method.objective.cond_drop_prob=0.5",
]  # fmt: skip
# name: (logger, what happens to the job, its time limit in minutes)
JOBS = {
    "ref": ("csv", "nothing: the uninterrupted run", 20),
    "requeue-csv": ("csv", "scontrol requeue at step >= 9", 20),
    "requeue-wandb": ("wandb", "scontrol requeue at step >= 9", 20),
    # 30 s before the limit SLURM sends USR2: submitit requeues the job, SLURM stops it (SIGTERM,
    # SIGKILL 5 s later); as often as the limit comes before the run is done.
    "limit-csv": ("csv", "its time limit", 1),
    "limit-wandb": ("wandb", "its time limit", 1),
}


def _resumed_steps(run_dir: Path) -> list[int]:
    """The steps the run's attempts resumed from, as its train.log says."""
    text = (run_dir / "train.log").read_text()
    return [int(s) for s in re.findall(r"Resuming from \S+ at step (\d+)", text)]


@pytest.mark.slow
def test_requeued_and_timed_out_trainings_equal_the_uninterrupted_run(
    slurm: LocalSlurm, tiny_cifar: Path, tmp_path: Path
) -> None:
    """Training jobs submitted as users do (``lt_diffusion.train --multirun
    hydra/launcher=slurm``), each interrupted by SLURM: ``scontrol requeue`` while it runs, or
    its time limit. Each attempt resumes at the last checkpoint the previous one left; the final
    state (weights, EMA, optimizer, random states) equals the uninterrupted job's bit for bit,
    the wandb run keeps its id (offline), the CSV log is the uninterrupted run's byte for byte.
    A run of another seed is shown unequal."""
    out = tmp_path / "outputs"
    runs = {name: out / "runs" / f"cifar10_lt-ir10-ddpm-seed0-{name}" for name in JOBS}
    procs, logs = {}, {}
    started = time.monotonic()
    for name, (logger, _, minutes) in JOBS.items():
        cmd = [
            sys.executable, "-m", "lt_diffusion.train", "--multirun", "hydra/launcher=slurm",
            f"hydra.launcher.name={name}", f"hydra.launcher.timeout_min={minutes}",
            "hydra.launcher.signal_delay_s=30", *TRAIN, f"logger={logger}", f"tag=-{name}",
            f"paths.data_root={tiny_cifar}", f"paths.output_dir={out}",
        ]  # fmt: skip
        logs[name] = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env={**slurm.env, "WANDB_MODE": "offline"}, stdout=logs[name],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    left_at: dict[str, list[int]] = {name: [] for name in JOBS}  # step of last.ckpt per requeue
    requeued, released = set(), set()
    try:
        deadline = time.monotonic() + 1800
        while any(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "the jobs did not finish in 30 minutes"
            for line in slurm.run("squeue", "-h", "-o", "%i|%j|%T|%r").split():
                job, name, state, reason = line.split("|")
                last = runs[name] / "checkpoints" / "last.ckpt"
                if name.startswith("requeue") and name not in requeued and state == "RUNNING":
                    if last.is_file() and _step(last) >= 9:
                        slurm.run("scontrol", "requeue", job)
                        requeued.add(name)
                elif state == "PENDING" and reason == "BeginTime":
                    # Requeued: its processes have ended. A requeued job waits ~2 minutes
                    # before it may start again: release it now.
                    restarts = re.search(
                        r"Restarts=(\d+)", slurm.run("scontrol", "show", "job", job)
                    )
                    key = (job, restarts.group(1) if restarts else "?")
                    if key not in released:
                        released.add(key)
                        left_at[name].append(_step(last) if last.is_file() else 0)
                    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
    elapsed = time.monotonic() - started
    for name, p in procs.items():
        assert p.returncode == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    print(f"SLURM jobs: {elapsed:.0f} s; steps left at each requeue: {left_at}")

    reference = runs["ref"] / "checkpoints" / "last.ckpt"
    assert _step(reference) == STEPS and left_at["ref"] == []
    for name in JOBS:
        if name == "ref":
            continue
        run_dir, logger = runs[name], JOBS[name][0]
        # Interrupted at least once mid-training, and each attempt resumed where the last left.
        assert any(0 < s < STEPS for s in left_at[name]), (name, left_at[name])
        assert set(_resumed_steps(run_dir)) == {s for s in left_at[name] if s > 0}, name
        if JOBS[name][1] == "its time limit":  # stopped at the end of a step, not mid-step
            assert (
                "the training stops at the end of this step" in (run_dir / "train.log").read_text()
            )
        assert_same_training_state(reference, run_dir / "checkpoints" / "last.ckpt")
        if logger == "wandb":
            ids = {p.name.rsplit("-", 1)[1] for p in run_dir.glob("wandb/offline-run-*")}
            attempts = len(list(run_dir.glob("wandb/offline-run-*")))
            assert len(ids) == 1 and attempts >= 2, (name, ids, attempts)
        else:
            csv_log = (run_dir / "logs" / "metrics.csv").read_bytes()
            assert csv_log == (runs["ref"] / "logs" / "metrics.csv").read_bytes(), name

    # The comparison can fail: the same job with another seed ends elsewhere.
    from lt_diffusion import train
    from tests.conftest import compose_config

    seed1 = tmp_path / "seed1"
    train.run(compose_config("train", [*TRAIN, "logger=csv", "seed=1", f"paths.data_root={tiny_cifar}",
                                       f"paths.run_dir={seed1}"]))  # fmt: skip
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_training_state(reference, seed1 / "checkpoints" / "last.ckpt")
