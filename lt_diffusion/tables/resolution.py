"""A table spec expanded into runs and records: every run's composed training config, its
directory, and the record each cell reads (its path and the settings digest it must carry);
reading those records (evaluation, classification and analysis records) and deciding which
still count.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The kinds of record a table reads (each registers itself with lt_diffusion.records).
from lt_diffusion.analysis import ANALYSES as _analysis_kind  # noqa: F401
from lt_diffusion.classification import record as _classification_kind  # noqa: F401
from lt_diffusion.classification.config import (
    classification_identity,
    classification_record_filename,
)
from lt_diffusion.evaluation.identity import evaluation_identity
from lt_diffusion.evaluation.protocol import protocol_sampler
from lt_diffusion.evaluation.record import record_filename  # (and the evaluation kind)
from lt_diffusion.records.base import RecordError, read_record
from lt_diffusion.tables.spec import EvalRef, RunRef, TableSpec, TableSpecError
from lt_diffusion.utils.config import CONFIG_DIR, ComposeOnce, compose_config
from lt_diffusion.utils.identity import training_settings


def analysis_digest(settings: Mapping[str, Any]) -> str:
    """A short digest of an analysis's settings (as its record stores them): a table's
    analysis record counts only when it was made under the table's settings."""
    text = json.dumps(settings, sort_keys=True, default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclass
class ResolvedRun:
    """A run with its composed training config, its directory and its records: the path and
    the settings digest each record must carry (a record made under other settings, or of an
    unfinished run, does not count)."""

    run: RunRef
    config: DictConfig
    run_dir: Path
    records: dict[EvalRef, Path]
    digests: dict[EvalRef, str] = field(default_factory=dict)

    @property
    def max_steps(self) -> int:
        return int(self.config.train.max_steps)

    @property
    def checkpoint(self) -> Path:
        """The run's ``last.ckpt``: what a run starting from it reads (resolved)."""
        return (self.run_dir / "checkpoints" / "last.ckpt").resolve()

    @property
    def start_point(self) -> Path | None:
        """The checkpoint the run starts from (``train.init_from``, resolved), if any."""
        start = self.config.train.get("init_from")
        return Path(start).resolve() if start else None

    def record_problem(self, ev: EvalRef) -> str | None:
        """Why the record of ``ev`` cannot be used (None when it can); ``"missing"`` when
        there is no file yet."""
        path = self.records[ev]
        if not path.is_file():
            return "missing"
        try:
            record = read_record(path)
        except RecordError as err:
            return str(err)
        return self.stale_reason(ev, record)

    def stale_reason(self, ev: EvalRef, record: Mapping[str, Any]) -> str | None:
        """Why a (valid) record at ``ev``'s path does not count for this table: made under
        other settings than the table's, or of an unfinished run; None when it counts."""
        name = self.records[ev].name
        if ev.analysis is not None:
            made = analysis_digest(record["settings"])
        else:
            made = record["identity"]["digest"]
        if made != self.digests.get(ev, made):
            return f"{name} was made under other settings than the table's"
        step = int(record["checkpoint"]["step"])
        # A classifier's budget is in epochs of its (possibly augmented) training set: its
        # record says how many steps the run was to take (the digest covers the budget).
        budget = (
            self.max_steps if self.run.task == "train" else int(record["checkpoint"]["max_steps"])
        )
        if step != budget:
            return f"{name} is of step {step}, the run trains to {budget}"
        return None

    @property
    def done(self) -> bool:
        if not self.records:  # a required run: done when trained to its last step
            from lt_diffusion.runs.checkpoint import CheckpointError, read_checkpoint

            try:
                ckpt = read_checkpoint(self.checkpoint)
            except (OSError, CheckpointError):  # none yet, or unreadable: training says which
                return False
            return int(ckpt.get("global_step", -1)) == self.max_steps
        return all(self.record_problem(ev) is None for ev in self.records)


def resolve(
    spec: TableSpec,
    train_overrides: Sequence[str] = (),
    eval_overrides: Sequence[str] = (),
    config_dir: str | Path = CONFIG_DIR,
) -> list[ResolvedRun]:
    """Compose every run's training config and every evaluation's config (as
    ``lt_diffusion.train`` / ``evaluate`` would) and name the run's directory and records, by
    the same settings digest the evaluation writes; any composition error names the run."""
    evals: dict[EvalRef, DictConfig] = {}

    def eval_config(ev: EvalRef) -> DictConfig:
        key = dataclasses.replace(ev, run=RunRef("", 0))
        if key not in evals:
            try:
                cfg = compose_config(
                    "evaluate", [*ev.eval_overrides(), *eval_overrides], config_dir
                )
                cfg.eval.sampler = protocol_sampler(cfg.eval, config_dir)
            except Exception as err:
                _check_vary(spec, [], eval_overrides, config_dir)  # the clearer error first
                raise TableSpecError(
                    f"table {spec.name}: evaluation {ev.eval_overrides()}: {err}"
                ) from err
            evals[key] = cfg
        return evals[key]

    out = []
    compose_run = SeedComposer(spec, train_overrides, config_dir)
    evaluations = spec.evaluations_by_run()
    for run in spec.runs():
        try:
            cfg = compose_run(run)
            run_dir = Path(cfg.paths.output_dir) / "runs" / str(cfg.run_name)
            if run.task == "classify":  # its test evaluation has no settings of its own
                identity = classification_identity(cfg, config_dir)
        except Exception as err:
            _check_vary(spec, train_overrides, [], config_dir)  # the clearer error first
            raise TableSpecError(
                f"table {spec.name}: run {run.key} does not compose: {err}"
            ) from err
        resolved = ResolvedRun(run, cfg, run_dir, {})
        out.append(resolved)
        if run.task == "classify":
            path = run_dir / "records" / classification_record_filename(identity["digest"])
            for ev in evaluations.get(run, []):
                resolved.records[ev] = path
                resolved.digests[ev] = identity["digest"]
            continue
        settings = None  # the run's training settings, resolved once for its evaluations
        for ev in evaluations.get(run, []):
            if ev.analysis is not None:
                digest = analysis_digest(_analysis_settings(spec.name, ev, config_dir))
                resolved.records[ev] = run_dir / "analyses" / f"{ev.analysis}-{digest}.json"
                resolved.digests[ev] = digest
                continue
            ecfg = eval_config(ev)
            guidance = ecfg.eval.get("guidance")
            guidance = float(cfg.sampler.guidance if guidance is None else guidance)
            settings = training_settings(cfg) if settings is None else settings
            identity = evaluation_identity(
                train_config=settings,  # training_settings() leaves its own output as it is
                protocol=ecfg.eval,
                sampler=ecfg.eval.sampler,
                guidance=guidance,
                theta_g_only=ev.theta_g_only,
            )
            name = record_filename(
                str(ecfg.eval.name),
                str(ecfg.eval.sampler.name),
                guidance,
                ev.theta_g_only,
                identity["digest"],
            )
            resolved.records[ev] = run_dir / "records" / name
            resolved.digests[ev] = identity["digest"]
    return out


class SeedComposer:
    """Compose runs' training configs, a row's seeds once: the runs of one row differ only in
    the keys that take the seed (``seed`` and the spec's ``vary``), plain values, so each row is
    composed once and its seeds are copies with those values set (:class:`ComposeOnce`). A run
    whose other overrides set one of those keys too is composed as it is."""

    def __init__(
        self, spec: TableSpec, train_overrides: Sequence[str], config_dir: str | Path
    ) -> None:
        self.keys = ["seed", *(k for k in spec.vary if not k.startswith("eval."))]
        self.train_overrides = list(train_overrides)
        self.compose = ComposeOnce(config_dir)

    def __call__(self, run: RunRef) -> DictConfig:
        overrides = [*run.train_overrides(), *self.train_overrides]
        seeded = {f"{k}={run.seed}" for k in self.keys}
        rest = [o for o in overrides if o not in seeded]
        if any(o.lstrip("+~").split("=")[0] in self.keys for o in rest):
            return compose_config(run.task, overrides, self.compose.config_dir)
        return self.compose(run.task, rest, dict.fromkeys(self.keys, run.seed))


def _analysis_settings(table: str, ev: EvalRef, config_dir: str | Path) -> dict[str, Any]:
    """The validated settings of an analysis cell, as its record will store them."""
    from lt_diffusion.analysis import ANALYSES
    from lt_diffusion.analysis.common import settings_from_config

    try:
        cfg = compose_config("analyze", [*ev.eval_overrides(), "checkpoint=x"], config_dir)
        settings = settings_from_config(ANALYSES[str(ev.analysis)][1], cfg.analysis)
    except Exception as err:
        raise TableSpecError(f"table {table}: analysis {ev.eval_overrides()}: {err}") from err
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def _check_vary(
    spec: TableSpec,
    train_overrides: Sequence[str],
    eval_overrides: Sequence[str],
    config_dir: str | Path,
) -> None:
    """Every key of ``vary:`` exists in the config it changes: ``eval.*`` in the evaluation
    config, any other in the training config of every experiment the table runs (called when a
    composition failed, to say so when a varied key is the cause)."""
    if not spec.vary:
        return
    runs = list(dict.fromkeys(RunRef(r.experiment, spec.seeds[0]) for r in spec.runs()))
    configs: list[tuple[str, DictConfig]] = []
    try:
        for run in runs:
            cfg = compose_config(run.task, [*run.train_overrides(), *train_overrides], config_dir)
            configs.append((f"the training config of {run.experiment}", cfg))
        if any(k.startswith("eval.") for k in spec.vary) and spec.task == "train":
            cfg = compose_config("evaluate", [f"eval={spec.eval}", *eval_overrides], config_dir)
            configs.append((f"the evaluation config (eval={spec.eval})", cfg))
    except Exception:  # not because of a varied key: the caller reports it
        return
    for key in spec.vary:
        for what, cfg in configs:
            if key.startswith("eval.") != what.startswith("the evaluation"):
                continue
            if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                near = difflib.get_close_matches(
                    leaf, list(node) if isinstance(node, DictConfig) else [], n=1
                )
                hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""
                raise TableSpecError(
                    f"table {spec.name}: vary: {key!r} is not a key of {what}{hint}; list keys "
                    "the runs have, e.g. imbalance.seed (the long-tailed draw) or eval.seed"
                )


_ABSENT = object()
