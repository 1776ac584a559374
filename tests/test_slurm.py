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

from lt_diffusion.training.checkpoint import read_checkpoint
from tests.conftest import ROOT
from tests.slurm_cluster import LocalSlurm, unavailable_reason
from tests.tables_fixture import TINY_EVAL, tiny_table_overrides, write_tiny_table

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
