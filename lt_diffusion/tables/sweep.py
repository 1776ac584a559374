"""The launch side of a table sweep: the manifest of pending jobs, the launcher checks, and the
Hydra multirun that runs the jobs (locally or through hydra-submitit-launcher on SLURM).

A *job* is one training run followed by every evaluation a table needs from it, in one process
group (:mod:`lt_diffusion.job`); runs that train together (``train.engine: vectorized``, the
seeds of one synthetic-benchmark row) are one job, each keeping its own run directory and
records. The table command writes the pending jobs into a manifest,
a JSON file that never changes afterwards, and starts ``python -m lt_diffusion.job --multirun
manifest=<file> job=0,1,...`` with the launcher the user chose; a requeued SLURM job reads the
same manifest again, so it resumes exactly the run it was given. Local workers side by side
(``workers=2``) each sweep every job and run those they claim first (:func:`claim`), so a
worker that finishes early takes the next job instead of idling behind a fixed share.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lt_diffusion.utils.io import atomic_write_json

MANIFEST_VERSION = 1
FAILED = "failed.json"  # in a run directory: the last failure of its job (removed on success)


class LauncherConfigError(ValueError):
    """A launcher setting contradicts the runs it would launch."""


@dataclass
class EvalJob:
    """One evaluation of a job's run: the evaluate overrides and the record it writes
    (``command: analyze``: an analysis record, the overrides ``lt_diffusion.analyze``'s)."""

    overrides: list[str]
    record: str
    command: str = "evaluate"


@dataclass
class Job:
    """One training run of a table and its evaluations."""

    key: str
    train_overrides: list[str]
    run_dir: str
    devices: int
    num_nodes: int
    evaluations: list[EvalJob] = field(default_factory=list)
    # train: a diffusion run, then lt_diffusion.evaluate for each evaluation; classify: a
    # classifier trained and tested by lt_diffusion.classify into its one record
    task: str = "train"
    # Runs trained in the same process as this one, each with its own directory and records
    # (train.engine: vectorized trains them at once, vectorised over their seeds).
    together: list[Job] = field(default_factory=list)

    @property
    def members(self) -> list[Job]:
        """This job's run and the runs trained together with it."""
        return [self, *self.together]

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _launcher_kind(launcher: Mapping[str, Any]) -> str:
    target = str(launcher.get("_target_", ""))
    if target.endswith("SlurmLauncher"):
        return "slurm"
    if target.endswith("submitit_launcher.LocalLauncher"):
        return "submitit_local"
    return "local"


def check_launcher(launcher: Mapping[str, Any], jobs: Sequence[Job], workers: int = 1) -> None:
    """Refuse a launcher that cannot run ``jobs`` as configured, before anything is submitted.

    Under SLURM every task is one training process, so ``tasks_per_node`` must equal the
    trainer's ``devices`` and ``nodes`` its ``num_nodes`` (Lightning reads its rank from SLURM).
    ``workers`` (local multiruns side by side) is for the local launcher only.
    """
    kind = _launcher_kind(launcher)
    if workers < 1:
        raise LauncherConfigError(f"workers must be >= 1, got {workers}")
    if kind == "local":
        return
    if workers > 1:
        raise LauncherConfigError(
            f"workers={workers} runs local multiruns side by side; under hydra/launcher={kind} "
            "the cluster runs the jobs in parallel (hydra.launcher.array_parallelism): drop "
            "workers"
        )
    for name in ("timeout_min", "tasks_per_node", "nodes"):
        value = launcher.get(name)
        if not isinstance(value, int) or value < 1:
            raise LauncherConfigError(
                f"hydra.launcher.{name} must be a positive integer, got {value!r}: set "
                f"hydra.launcher.{name}=<n>"
            )
    mem = launcher.get("mem_gb")
    if mem is not None and (not isinstance(mem, int) or mem < 1):
        raise LauncherConfigError(
            f"hydra.launcher.mem_gb must be a positive integer or null, got {mem!r}"
        )
    if kind == "slurm":
        if int(launcher.get("array_parallelism", 1)) < 1:
            raise LauncherConfigError("hydra.launcher.array_parallelism must be >= 1")
        setup = launcher.get("setup")
        if setup is not None and not all(isinstance(s, str) for s in setup):
            raise LauncherConfigError("hydra.launcher.setup must be a list of shell lines")
    tasks, nodes = int(launcher["tasks_per_node"]), int(launcher["nodes"])
    for job in jobs:
        if (job.devices, job.num_nodes) != (tasks, nodes):
            raise LauncherConfigError(
                f"run {job.key} trains on trainer.devices={job.devices} x trainer.num_nodes="
                f"{job.num_nodes}, but the launcher starts tasks_per_node={tasks} x nodes={nodes}: "
                f"set hydra.launcher.tasks_per_node={job.devices} hydra.launcher.nodes="
                f"{job.num_nodes} (or change the trainer)"
            )


def write_manifest(path: Path, table: str, jobs: Sequence[Job]) -> Path:
    """The jobs of one sweep, written once (atomically) before anything is launched."""
    body = {
        "version": MANIFEST_VERSION,
        "table": table,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jobs": [asdict(job) for job in jobs],
    }
    return atomic_write_json(path, body)


def read_manifest(path: str | Path) -> tuple[str, list[Job]]:
    """``(table name, jobs)`` of a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sweep manifest {path} not found: start sweeps with lt_diffusion.table"
        )
    body = json.loads(path.read_text())
    if body.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} is not a version-{MANIFEST_VERSION} sweep manifest")
    return body["table"], [_job(j) for j in body["jobs"]]


def _job(j: dict[str, Any]) -> Job:
    evals = [EvalJob(**e) for e in j.pop("evaluations")]
    together = [_job(t) for t in j.pop("together", [])]
    return Job(**j, evaluations=evals, together=together)


def read_failure(run_dir: str | Path) -> dict[str, Any] | None:
    """The failure a run's last job left (``None`` when its last job did not fail)."""
    path = Path(run_dir) / FAILED
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"error": f"unreadable {path}", "log": str(path)}


SWEEP_LOG_ENV = "LT_DIFFUSION_SWEEP_LOG"
CLAIMS = "claims"  # in a sweep folder: one file per job a local worker has taken


def claim(claims: str | Path, index: int) -> bool:
    """Take job ``index`` for this worker: ``True`` once, for the first worker that asks
    (an exclusive create, atomic on a local or NFS v3+ file system); the file says who. A job
    whose worker was killed stays claimed in this sweep: the table's next call launches it
    again, as it does every run without its records."""
    claims = Path(claims)
    claims.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(claims / f"job{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(
            f"{socket.gethostname()} pid {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        )
    return True


def launch(
    manifest: Path,
    n_jobs: int,
    hydra_overrides: Sequence[str],
    sweep_dir: Path,
    workers: int = 1,
) -> int:
    """Run the manifest's jobs as Hydra multiruns of :mod:`lt_diffusion.job` and wait.

    ``hydra_overrides`` are the user's ``hydra/launcher=...`` and ``hydra.launcher.*``
    overrides, passed on unchanged. ``workers`` multiruns run side by side, each over every job,
    running the jobs it claims first (``<sweep_dir>/claims``): the jobs are handed out in
    order to whichever worker is free. Hydra writes no ``.hydra`` folder for them (the job a
    worker passes over would write it again; the manifest holds every job's settings). Their
    output is shown and kept in ``<sweep_dir>/jobs.log`` (the
    log of jobs that run here; SLURM jobs have their own), line by line. Returns the first
    non-zero exit code, else 0; the jobs record their failures in their run directories, so
    one failed job never stops the others.
    """
    if n_jobs < 1:
        return 0
    if workers < 1:
        raise LauncherConfigError(f"workers must be >= 1, got {workers}")
    log_path = Path(sweep_dir) / "jobs.log"
    env = {**os.environ, SWEEP_LOG_ENV: str(log_path)}
    workers = min(workers, n_jobs)
    if workers == 1:
        sweeps = [[f"job=range(0,{n_jobs})"]]
    else:
        sweeps = [[f"job=range(0,{n_jobs})", f"claims={Path(sweep_dir) / CLAIMS}",
                   "hydra.output_subdir=null"]] * workers  # fmt: skip
    lock = threading.Lock()
    with open(log_path, "ab") as log:

        def relay(proc: subprocess.Popen) -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                with lock:
                    log.write(line)
                    log.flush()
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()

        procs = []
        for sweep in sweeps:
            cmd = [
                sys.executable, "-m", "lt_diffusion.job", "--multirun", f"manifest={manifest}",
                *sweep, f"hydra.sweep.dir={sweep_dir}", *hydra_overrides,
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            thread = threading.Thread(target=relay, args=(proc,), daemon=True)
            thread.start()
            procs.append((proc, thread))
        codes = []
        for proc, thread in procs:
            codes.append(proc.wait())
            thread.join()
    return next((c for c in codes if c != 0), 0)
