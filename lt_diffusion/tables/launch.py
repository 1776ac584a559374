"""Launching a table: plan (every run resolved, the start points checked, the jobs built),
launch the pending jobs in waves through a Hydra multirun of :mod:`lt_diffusion.job`, then
aggregate the records and write the table. The command is :mod:`lt_diffusion.table`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.runs.build import objective_passes
from lt_diffusion.tables import (
    ResolvedRun,
    TableSpec,
    TableSpecError,
    available_tables,
    collect,
    load_table,
    resolve,
    to_markdown,
    write_table,
)
from lt_diffusion.tables.sweep import (
    EvalJob,
    Job,
    check_launcher,
    launch,
    read_failure,
    write_manifest,
)
from lt_diffusion.training import vectorized
from lt_diffusion.training.config_keys import unknown_keys


def _launcher_overrides() -> list[str]:
    """The user's launcher choice and settings, to hand on to the jobs' multirun."""
    task = HydraConfig.get().overrides.hydra
    return [o for o in task if o.startswith(("hydra/launcher", "hydra.launcher"))]


def _paths(cfg: DictConfig) -> list[str]:
    """The sweep's own paths (data, outputs, caches), for every job."""
    return [
        f"paths.{k}={Path(cfg.paths[k]).resolve()}"
        for k in ("data_root", "output_dir", "cache_dir")
    ]


def _overrides(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """Overrides of every run and every evaluation: the sweep's own paths, then the user's
    ``train_overrides`` / ``eval_overrides`` (analyses take the paths only)."""
    paths = _paths(cfg)
    return [*paths, *cfg.train_overrides], [*paths, *cfg.eval_overrides]


def plan(cfg: DictConfig) -> tuple[TableSpec, list[ResolvedRun], list[Job]]:
    """The table spec, its resolved runs, and one job per run (all checks done here)."""
    if cfg.get("table") is None or "name" not in cfg.table:  # so that --help composes without one
        raise TableSpecError(
            f"choose the table to reproduce: table=<name>, one of {', '.join(available_tables())}"
        )
    spec = load_table(cfg.table)
    train_overrides, eval_overrides = _overrides(cfg)
    paths = _paths(cfg)
    resolved = resolve(spec, train_overrides, eval_overrides)
    check_run_keys(spec, resolved)
    jobs = [
        Job(
            key=r.run.key,
            train_overrides=[*r.run.train_overrides(), *train_overrides],
            run_dir=str(r.run_dir),
            devices=int(r.config.trainer.devices),
            num_nodes=int(r.config.trainer.num_nodes),
            evaluations=[
                EvalJob(
                    overrides=[*ev.eval_overrides(), *(paths if ev.analysis else eval_overrides)],
                    record=str(path),
                    command=ev.command,
                )
                for ev, path in r.records.items()
            ],
            task=r.run.task,
        )
        for r in resolved
    ]
    return spec, resolved, jobs


def check_run_keys(spec: TableSpec, resolved: list[ResolvedRun]) -> None:
    """Refuse, before anything is launched, a training run whose config has a key nothing
    reads: a row's ``+method.objective.<key>`` its method does not take (a hyperparameter grid
    over a setting the method does not have) would otherwise fail only when its job starts."""
    for r in resolved:
        problems = unknown_keys(r.config) if r.run.task == "train" else []
        if problems:
            raise TableSpecError(
                f"table {spec.name}: run {r.run.key}: " + "; ".join(problems)
                + ". Fix the row's overrides (each key must be a setting of its method, model, "
                "...), or drop the row"
            )  # fmt: skip


def check_start_points(resolved: list[ResolvedRun]) -> None:
    """Refuse to launch a run that starts from another run's checkpoint (``train.init_from``:
    fine-tuning, distillation) when that checkpoint does not exist and no run of this table
    trains it (Table G.9's rows distil Table 2's DDPM runs)."""
    trained = {r.checkpoint for r in resolved}
    for r in resolved:
        start = r.start_point
        if start is None or start in trained or start.is_file() or r.done:
            continue
        raise TableSpecError(
            f"{r.run.key} starts from {start} (train.init_from), which does not exist and no run "
            "of this table trains it: train that run first (its experiment, or a table that "
            "has it), then run this table again"
        )


def launch_waves(pending: list[ResolvedRun]) -> list[list[int]]:
    """Indices of ``pending`` in launch order, wave by wave: a run that starts from another
    pending run's checkpoint (``train.init_from``) goes in a wave after that run's."""
    produced = {r.checkpoint: i for i, r in enumerate(pending)}
    wave: dict[int, int] = {}

    def depth(i: int, chain: tuple[int, ...] = ()) -> int:
        if i in chain:
            raise TableSpecError(f"{pending[i].run.key} starts from its own checkpoint (a cycle)")
        if i not in wave:
            j = produced.get(pending[i].start_point)
            wave[i] = 0 if j is None else depth(j, (*chain, i)) + 1
        return wave[i]

    for i in range(len(pending)):
        depth(i)
    return [[i for i in wave if wave[i] == k] for k in range(max(wave.values(), default=-1) + 1)]


def together(pairs: list[tuple[Job, ResolvedRun]]) -> list[Job]:
    """The jobs of one wave, with the runs that train together (``train.engine: vectorized``,
    settings equal but for the seeds: the seeds of a synthetic-benchmark row) made one job:
    the first such run's, holding the others in ``together``."""
    out: list[Job] = []
    lead: dict[str, Job] = {}
    for job, r in pairs:
        key = vectorized.group_key(r.config)
        if key is None or job.task != "train":
            out.append(job)
        elif key in lead:
            lead[key].together.append(job)
        else:
            lead[key] = job
            out.append(job)
    return out


def training_work(r: ResolvedRun) -> float:
    """A run's training cost, to order jobs by: steps x batch x denoiser passes per example."""
    cfg = r.config
    method = cfg.get("method")
    passes = objective_passes(method.get("objective")) if method is not None else 1
    # A classifier's budget is in epochs (``train.max_steps: null``): its runs weigh the same.
    steps = OmegaConf.select(cfg, "train.max_steps") or 1
    batch = OmegaConf.select(cfg, "data.batch_size") or 1
    return float(steps) * float(batch) * max(passes, 1)


def costliest_first(jobs: list[Job], work: dict[str, float]) -> list[Job]:
    """The jobs by their runs' summed ``work`` (by run key), the costliest first (stable): free
    workers take the next job, so the last jobs to start, which set when a sweep ends, are then
    the short ones (longest-processing-time-first scheduling)."""
    return sorted(jobs, key=lambda job: -sum(work[m.key] for m in job.members))


def run(cfg: DictConfig, hydra_overrides: list[str], launcher: Any, sweep_dir: Path) -> Path:
    """Launch what is missing (the runs other runs start from first), then write the table;
    returns the Markdown file."""
    spec, resolved, jobs = plan(cfg)
    check_launcher(OmegaConf.to_container(launcher, resolve=True), jobs, int(cfg.workers))
    if cfg.launch:
        check_start_points(resolved)
    todo = [(job, r) for job, r in zip(jobs, resolved) if not r.done]
    print(f"{spec.name}: {len(jobs)} runs, {len(jobs) - len(todo)} done, {len(todo)} to run")
    waves = launch_waves([r for _, r in todo]) if todo and cfg.launch else []
    for k, indices in enumerate(waves):
        pairs = []
        for job, r in (todo[i] for i in indices):
            if r.start_point is not None and not r.start_point.is_file():  # its run failed
                print(f"  skipped {job.key}: {r.start_point} was not trained (see its failure)")
            else:
                pairs.append((job, r))
        wave = costliest_first(together(pairs), {job.key: training_work(r) for job, r in pairs})
        if not wave:
            continue
        wave_dir = sweep_dir if len(waves) == 1 else sweep_dir / f"wave{k}"
        wave_dir.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(wave_dir / "manifest.json", spec.name, wave)
        for i, job in enumerate(wave):
            print(f"  job {i}: {job.key} -> {job.run_dir}")
            for other in job.together:
                print(f"         with {other.key} -> {other.run_dir}")
        code = launch(manifest, len(wave), hydra_overrides, wave_dir, int(cfg.workers))
        if code != 0:
            print(f"The sweep exited with code {code}; failed runs are marked in the table.")
    failures = {}
    for job, r in zip(jobs, resolved):
        failure = None if r.done else read_failure(job.run_dir)
        if failure is not None:
            failures[job.key] = str(failure.get("log") or Path(job.run_dir) / "failed.json")
    result = collect(spec, resolved, failures, list(cfg.train_overrides), list(cfg.eval_overrides))
    paths = write_table(result, Path(cfg.paths.output_dir) / "tables")
    print(to_markdown(result))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return paths["md"]


def run_from_command_line(cfg: DictConfig) -> Path:
    """:func:`run` with the launcher Hydra was given on the command line."""
    hc = HydraConfig.get()
    return run(cfg, _launcher_overrides(), hc.launcher, Path(hc.runtime.output_dir))
