"""One writer per run directory: a second training is refused with a message naming the
holder; dead holders and requeues of the same SLURM job take over; races have one winner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from lt_diffusion.utils.runlock import LOCK_NAME, RunLock, RunLockedError, hold_run_lock
from tests.conftest import ROOT, python_process

HOLD = """
import sys
from lt_diffusion.utils.runlock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
lock.release()
"""


def _holder(run_dir: Path, **env: str) -> subprocess.Popen:
    """A live process (another pid, ``env`` added) holding the run directory's lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, **fields) -> dict:
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": None,
        "slurm_job_id": None,
        "since": "2026-01-01T00:00:00+00:00",
        "command": "python -m lt_diffusion.train",
        "token": "theirs",
        **fields,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def _owner(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK_NAME).read_text())


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"process {holder.pid} on host {socket.gethostname()}" in msg
        assert str(tmp_path / LOCK_NAME) in msg and "tag=" in msg  # what to do
        assert _owner(tmp_path)["pid"] == holder.pid  # the holder keeps its lock
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (tmp_path / LOCK_NAME).exists()  # released


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_refused_training_touches_nothing_in_the_live_run(train_overrides, tmp_path) -> None:
    """The train command as a user runs it, on a run another training holds: refused, naming
    the holder, and not one file of the live run is written, replaced or added (Hydra's launch
    record .hydra/ and train.log included: the lock holder writes those)."""
    overrides = train_overrides("train.max_steps=2")
    run_dir = tmp_path / "outputs" / "runs" / "cifar10_lt-ir10-ddpm-seed0"  # derived by Hydra
    for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log",
                 "config.yaml", "checkpoints/last.ckpt", "logs/metrics.csv"):  # fmt: skip
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(f"the live run's {name}\n")
    holder = _holder(run_dir)
    try:
        before = _tree(run_dir)
        proc = python_process(["-m", "lt_diffusion.train", *overrides])
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode != 0 and f"process {holder.pid} on host" in log, log[-3000:]
        assert _tree(run_dir) == before
    finally:
        holder.communicate("")


def test_a_candidate_lock_file_swept_meanwhile_is_written_again(tmp_path, monkeypatch) -> None:
    # The holder's start sweeps .train.lock.*.tmp: a refused process racing it must still get
    # its answer (here: the lock, as the holder is gone by then), not a FileNotFoundError.
    link, calls = os.link, []

    def swept_first(src, dst):
        calls.append(src)
        if len(calls) == 1:
            Path(src).unlink()
        return link(src, dst)

    monkeypatch.setattr(os, "link", swept_first)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert len(calls) == 2 and lock.lost() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.lock.guard", LOCK_NAME]


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    stale = _write_lock(tmp_path, pid=_dead_pid())
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.took_over == stale
    assert _owner(tmp_path)["pid"] == os.getpid() and lock.lost() is None
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    # Our own (live) pid, but a start time that is not ours: the holder died, the pid was reused.
    _write_lock(tmp_path, pid=os.getpid(), pid_start="1")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.took_over is not None


def test_a_requeue_of_the_same_slurm_job_takes_over(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, host="node-17", pid=1, slurm_job_id="4242")  # the job's first run
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.took_over["host"] == "node-17"
    assert _owner(tmp_path)["slurm_job_id"] == "4242" and lock.lost() is None


@pytest.mark.parametrize(
    "holder",
    [
        {"host": "node-17", "pid": 1, "slurm_job_id": "999"},  # another job
        {"host": "node-17", "pid": 1, "slurm_job_id": None},  # another host, no job
    ],
)
def test_a_holder_that_may_be_alive_is_not_taken_over(tmp_path, monkeypatch, holder) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, **holder)
    with pytest.raises(RunLockedError, match="process 1 on host node-17"):
        RunLock(tmp_path).acquire()


def test_a_live_process_of_the_same_slurm_job_is_not_taken_over(tmp_path, monkeypatch) -> None:
    # Two trainings in one allocation: same job id, the holder alive on this host.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder = _holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(RunLockedError, match="SLURM job 4242"):
            RunLock(tmp_path).acquire()
    finally:
        holder.communicate("")


RACE = """
import sys, time
from pathlib import Path
from lt_diffusion.utils.runlock import RunLock, RunLockedError
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
try:
    RunLock(sys.argv[1]).acquire()
    print("won", flush=True)
    sys.stdin.read()  # hold it until every racer has answered (the test closes our stdin)
except RunLockedError:
    print("refused", flush=True)
"""


def test_processes_racing_for_a_stale_lock_have_one_winner(tmp_path: Path) -> None:
    run_dir, go = tmp_path / "run", tmp_path / "go"
    _write_lock(run_dir, pid=_dead_pid())
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(run_dir), str(go)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(10)
    ]
    try:
        # All start together, however slowly a busy machine starts them, and the winner holds
        # the lock until every other racer has tried it.
        assert [p.stdout.readline().strip() for p in racers] == ["ready"] * 10
        go.touch()
        results = sorted(p.stdout.readline().strip() for p in racers)
    finally:
        for p in racers:
            p.communicate("", timeout=300)
    assert results == ["refused"] * 9 + ["won"]


def test_the_lock_is_released_when_training_fails(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), hold_run_lock(tmp_path) as lock:
        assert _owner(tmp_path)["token"] == lock.me["token"]
        raise ZeroDivisionError("a failing step")
    assert not (tmp_path / LOCK_NAME).exists()


def test_other_ranks_take_no_lock(tmp_path: Path) -> None:
    _write_lock(tmp_path, host="node-17", pid=1)  # rank 0 (elsewhere) holds it
    with hold_run_lock(tmp_path, enabled=False) as lock:
        assert lock is None
    assert _owner(tmp_path)["host"] == "node-17"


@pytest.mark.parametrize(
    "env,zero",
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
        ({"LOCAL_RANK": "1"}, False),  # a child of Lightning's own launcher
        ({"NODE_RANK": "1"}, False),  # the first process of the second node
        ({"SLURM_PROCID": "2"}, False),  # a SLURM task
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning spawned inside sbatch
    ],
)
def test_only_global_rank_zero_locks(monkeypatch, env: dict, zero: bool) -> None:
    from lt_diffusion.training.run import launch_rank

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert (launch_rank() == 0) is zero


class TakeOverAt(L.Callback):
    """Writes another training's lock into the run directory when step ``step`` ends, as a
    requeue that declared this one dead would (added with +callbacks.<name>._target_=...)."""

    def __init__(self, run_dir: str, step: int) -> None:
        self.run_dir, self.step = Path(run_dir), step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            _write_lock(self.run_dir, host="node-17", pid=1, slurm_job_id="4242")


def test_a_run_that_lost_its_lock_stops_without_writing(train_overrides, tmp_path: Path) -> None:
    """A requeue took over while the original still runs: the original's next checkpoint
    write is refused instead of overwriting the new owner's."""
    from lt_diffusion import train
    from lt_diffusion.runs.checkpoint import read_checkpoint
    from tests.conftest import compose_config

    run_dir = tmp_path / "run"
    cfg = compose_config(
        "train",
        train_overrides(
            "train.max_steps=8",
            "train.ckpt_every=2",
            "data.batch_size=4",
            f"paths.run_dir={run_dir}",
            f"+callbacks.thief._target_={__name__}.TakeOverAt",
            f"+callbacks.thief.run_dir={run_dir}",
            "+callbacks.thief.step=3",
        ),
    )
    with pytest.raises(RunLockedError, match="process 1 on host node-17, SLURM job 4242"):
        train.run(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2  # written while it owned the directory
    assert not list(last.parent.glob("*.tmp"))
    assert _owner(run_dir)["host"] == "node-17"  # the new owner's lock stays
