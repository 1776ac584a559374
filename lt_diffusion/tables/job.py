"""One job of a table sweep: train a run (resuming it) and write every record the table needs
from it, in one process group. Started by :mod:`lt_diffusion.table` through a Hydra multirun:

    python -m lt_diffusion.job --multirun manifest=<sweep>/manifest.json job=0,1,2 \
        hydra/launcher=slurm

Under SLURM each task is one training process (Lightning reads its rank from SLURM); with the
local launcher a multi-device job starts itself again under ``torchrun``. A failing job writes
``<run_dir>/failed.json`` (error, traceback, the path of its log) and, when it is alone in its
process group, returns normally so that the other jobs of the sweep go on. A SIGTERM (SLURM
requeue, preemption, time limit) is not a failure: the training loop saves ``last.ckpt`` and
the process exits without a result, and the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, open_dict

from lt_diffusion.records.base import RecordError, read_record
from lt_diffusion.runs.checkpoint import read_checkpoint
from lt_diffusion.tables import resolution as _kinds  # noqa: F401  (the kinds a table reads)
from lt_diffusion.tables.sweep import FAILED, SWEEP_LOG_ENV, Job, claim, read_manifest
from lt_diffusion.utils.config import ComposeOnce, compose_config
from lt_diffusion.utils.io import atomic_write_json


def _log_path() -> str | None:
    """Where this job's output goes: submitit's log under SLURM, else the sweep's log."""
    if "SUBMITIT_EXECUTOR" in os.environ:
        try:
            import submitit

            return str(submitit.JobEnvironment().paths.stdout)
        except RuntimeError:
            pass
    return os.environ.get(SWEEP_LOG_ENV)


def _in_process_group() -> bool:
    """Whether a launcher already started one process per device (torchrun or SLURM tasks)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def train_config(job: Job, table: str) -> DictConfig:
    """The job's composed config (``train``, or ``classify`` for a classification row): its
    overrides, its run directory, and wandb runs grouped by table (group) and experiment (job
    type)."""
    cfg = compose_config(job.task, [*job.train_overrides, f"paths.run_dir={job.run_dir}"])
    return _grouped(cfg, job, table)


def train_configs(jobs: Sequence[Job], table: str) -> list[DictConfig]:
    """:func:`train_config` of each job. Runs trained together differ only in plain values
    (their seeds and run directories), so their overrides are composed once and the values set
    on copies (:class:`ComposeOnce`); jobs whose overrides differ otherwise are each composed."""
    plain = _plain_differences(jobs)
    if plain is None:
        return [train_config(j, table) for j in jobs]
    shared, values = plain
    compose = ComposeOnce()
    try:
        cfgs = [compose(jobs[0].task, shared, v) for v in values]
    except KeyError:  # a differing key is a config group, not a value: Hydra must compose it
        return [train_config(j, table) for j in jobs]
    return [_grouped(cfg, j, table) for cfg, j in zip(cfgs, jobs, strict=True)]


def _plain_differences(jobs: Sequence[Job]) -> tuple[list[str], list[dict[str, Any]]] | None:
    """The overrides the jobs share and, per job, the ``key: value`` of those that differ
    (with ``paths.run_dir``); None when a differing override is not a plain ``key=value``."""
    lists = [list(j.train_overrides) for j in jobs]
    if len({len(o) for o in lists}) != 1 or len({j.task for j in jobs}) != 1:
        return None
    differ = [i for i in range(len(lists[0])) if len({o[i] for o in lists}) > 1]
    shared = [o for i, o in enumerate(lists[0]) if i not in differ]
    parser = OverridesParser.create()
    values = []
    for job, overrides in zip(jobs, lists, strict=True):
        parsed = parser.parse_overrides([overrides[i] for i in differ])
        if any(p.type != OverrideType.CHANGE or p.is_sweep_override() for p in parsed):
            return None
        values.append({**{p.key_or_group: p.value() for p in parsed}, "paths.run_dir": job.run_dir})
    return shared, values


def _grouped(cfg: DictConfig, job: Job, table: str) -> DictConfig:
    """wandb runs grouped by table (group) and experiment (job type)."""
    logger = cfg.get("logger")
    if logger is not None and str(logger.get("_target_", "")).endswith("WandbLogger"):
        with open_dict(cfg):
            cfg.logger.group = table
            cfg.logger.job_type = job.key.rsplit("/seed", 1)[0]
            cfg.logger.tags = [table]
    return cfg


def missing_records(job: Job, step: int | None = None) -> list[int]:
    """Indices of the job's evaluations whose record does not exist yet (or, given the
    trained checkpoint's ``step``, is of another step: an evaluation of an unfinished run)."""
    out = []
    for i, ev in enumerate(job.evaluations):
        path = Path(ev.record)
        if not path.is_file():
            out.append(i)
        elif step is not None:
            try:
                if int(read_record(path)["checkpoint"]["step"]) != step:
                    out.append(i)
            except RecordError:
                out.append(i)
    return out


def run_job(job: Job, table: str) -> str:
    """Train, then evaluate what is missing (a job without evaluations, a run other runs start
    from, only trains); returns ``"done"`` (the caller handles failures). The runs of a job
    that trains several together (``job.together``) train at once, then each is evaluated."""
    from lt_diffusion.training import run as train

    todo = [j for j in job.members if not (j.evaluations and not missing_records(j))]
    if not todo:
        return "done"
    cfgs = train_configs(todo, table)
    if job.task == "classify":  # trains, then writes its one record (every evaluation's path)
        from lt_diffusion.classification.run import run as classify

        classify(cfgs[0], record=job.evaluations[0].record)
        (Path(job.run_dir) / FAILED).unlink(missing_ok=True)
        return "done"
    if len(todo) == 1:
        train.run(cfgs[0])
    else:
        train.run_together(cfgs)
    compose = ComposeOnce()  # the runs' evaluations differ in checkpoint and record only
    for j, cfg in zip(todo, cfgs):
        evaluate_run(j, cfg, compose)
    return "done"


def evaluate_run(job: Job, cfg: DictConfig, compose: ComposeOnce | None = None) -> None:
    """Write the trained run's missing records, then clear its failure mark (``compose``:
    evaluation configs composed before, for the runs of a job trained together)."""
    from lt_diffusion.analysis import run as analyze
    from lt_diffusion.evaluation import run as evaluate
    from lt_diffusion.evaluation.distributed import barrier

    ckpt = Path(job.run_dir) / "checkpoints" / "last.ckpt"
    step = int(read_checkpoint(ckpt)["global_step"])
    # The data are where this job's run says they are (not where the checkpoint was trained).
    data_root = f"data_root={Path(cfg.paths.data_root).resolve()}"
    compose = compose or ComposeOnce()
    for i in missing_records(job, step):
        ev = job.evaluations[i]
        ecfg = compose(
            ev.command, [*ev.overrides, data_root], {"checkpoint": str(ckpt), "record": ev.record}
        )
        if ev.command == "analyze":
            if _rank() == 0:  # an analysis runs on one device
                analyze.run(ecfg)
        else:
            evaluate.run(ecfg)
        barrier()  # rank 0 has written the record before any rank moves on
    (Path(job.run_dir) / FAILED).unlink(missing_ok=True)


def record_failure(job: Job, err: BaseException, log: str | None) -> Path:
    path = Path(job.run_dir) / FAILED
    body = {
        "job": job.key,
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(err)),
        "log": log,
        "rank": _rank(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return atomic_write_json(path, body)


def run_under_torchrun(job: Job, manifest: str, index: int) -> str:
    """Start this job again as ``devices`` local processes (a multi-device local run)."""
    if job.num_nodes > 1:
        raise ValueError(
            f"run {job.key} wants trainer.num_nodes={job.num_nodes}: the local launcher runs on "
            "one machine; use hydra/launcher=slurm for several nodes"
        )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={job.devices}",
        "-m", "lt_diffusion.job", f"manifest={manifest}", f"job={index}",
        "hydra.output_subdir=null", f"hydra.run.dir={Path(job.run_dir) / 'job'}",
    ]  # fmt: skip
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        if not (Path(job.run_dir) / FAILED).is_file():
            record_failure(job, RuntimeError(f"torchrun exited with code {code}"), _log_path())
        return "failed"
    return "done"


def run(cfg: DictConfig) -> Any:
    """Run job ``cfg.job`` of the sweep manifest ``cfg.manifest``; returns its status (a
    failure is recorded in the run directory of each run of the job). With ``cfg.claims`` (local
    workers side by side) only a job this worker claims first runs; the others are ``taken``."""
    table, jobs = read_manifest(cfg.manifest)
    index = int(cfg.job)
    if not 0 <= index < len(jobs):
        raise ValueError(f"job={index} is not in {cfg.manifest} ({len(jobs)} jobs)")
    job = jobs[index]
    if cfg.get("claims") and not claim(cfg.claims, index):
        return "taken"  # another local worker runs it
    if job.world_size > 1 and not _in_process_group():
        return run_under_torchrun(job, str(cfg.manifest), index)
    log = _log_path()
    try:
        status = run_job(job, table)
    except Exception as err:  # a failed run must never stop the others
        if _rank() == 0:
            print(f"[{job.key}] failed: {err}\n  log: {log}", file=sys.stderr)
            for member in job.members:
                record_failure(member, err, log)
        if job.world_size > 1:
            raise  # the other ranks would wait for this one forever: end the process group
        traceback.print_exc()
        return "failed"
    print(f"[{job.key}] {status}: {job.run_dir}")
    return status
