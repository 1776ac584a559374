"""Table specs (``configs/table/<name>.yaml``): which runs make a paper table's cells, the
metric of each column and the published numbers, parsed and checked (their expansion into runs
and records: :mod:`lt_diffusion.tables.resolution`).

A spec::

    name: cm_table2
    title: ...                 source: ...          seeds: [0, 1, 2]
    eval: cm_paper             # protocol of every cell (a row may override eval / sampler /
    sampler: ddim              #   guidance / theta_g_only); sampler: a configs/sampler/ group,
                               #   or {group: dpm_solver, steps: 15}; omitted: the protocol's
    columns:                   # key, label, metric path in the record, better, digits
      - {key: fid, label: FID, metric: overall.fid, better: lower, digits: 2}
    blocks:                    # row groups, as the paper's table has them
      - label: CIFAR-10-LT, IR=100
        rows:
          - {label: DDPM, experiment: cm/cifar10_lt_ir100_ddpm, published: [10.697]}
          - {label: 'CM, theta_g only', tex: 'CM ($\\theta^g$)', ...}

A column's metric is a path in an evaluation record (``overall.fid``) or in an **analysis
record** (``analysis.<analysis>.<path in its results>``, e.g.
``analysis.concept_dominance.mean_share_gap``): such cells are made by ``ltd-analyze`` on the
run's checkpoint (a row may set the analysis's settings: ``analysis: {lora_scale: 0}``).

A row's ``experiment`` is one experiment for all columns or a mapping ``column key ->
experiment`` (tables whose columns are datasets); ``published`` is a list aligned with the
columns or a mapping; ``missing: <reason>`` keeps a row the project cannot run in the table.
A column, block or row may add ``tex:``, its label as LaTeX (written into the ``.tex`` as is),
where the plain ``label`` (Markdown, CSV, and escaped into the ``.tex`` otherwise) holds math.

``requires:`` lists experiments the table trains (at its seeds) without evaluating them: the
runs its rows start from (``train.init_from``, e.g. Table G.9's distillation teachers), trained
before the rows that start from them.

Statistics (docs/tables.md, "Reading the statistics"): each block's rows are compared with its
``baseline:`` row (a label; default the first row) over the seeds both have. ``vary:`` lists
config keys that take the seed as well (``imbalance.seed``: each seed redraws the long-tailed
subset; ``eval.seed``: the evaluation's noise); ``test: t | permutation`` and ``alpha:`` choose
the test of the marks; ``view: values | diff`` what the cells show (``table.view=diff``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lt_diffusion.classification import record as _classification_record  # noqa: F401 (its metrics)
from lt_diffusion.classification.config import (
    experiment_task,
)
from lt_diffusion.evaluation.metrics import METRICS
from lt_diffusion.utils.config import CONFIG_DIR
from lt_diffusion.utils.lazy import moved

_COMPARISON = re.compile(r"^(overall|per_split\.(many|medium|few)|per_class\.(class_)?\d+)$")


ANALYSIS_PREFIX = "analysis."


def analysis_of(path: str) -> str | None:
    """The analysis a metric path reads (``analysis.<name>.<results path>``), else None."""
    parts = str(path).split(".")
    return parts[1] if str(path).startswith(ANALYSIS_PREFIX) and len(parts) >= 3 else None


def metric_path_ok(path: str, config_dir: str | Path = CONFIG_DIR) -> bool:
    """Whether ``path`` names a comparison and a registered metric (``per_split.few.fid``), or
    an analysis (``configs/analysis/<name>.yaml``) and a path in its record's results."""
    if str(path).startswith(ANALYSIS_PREFIX):
        name = analysis_of(path)
        return name is not None and (Path(config_dir) / "analysis" / f"{name}.yaml").is_file()
    where, _, name = str(path).rpartition(".")
    return bool(_COMPARISON.match(where)) and name in METRICS


BETTER = ("lower", "higher")
VIEWS = ("values", "diff")  # a cell's mean ± std, or its difference to the baseline ± CI


class TableSpecError(ValueError):
    """A table spec that cannot be run as written."""


@dataclass(frozen=True)
class RunRef:
    """One training run: an experiment row file at a seed (plus rare extra overrides)."""

    experiment: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        """The command that runs the row: ``train`` (a diffusion row, then ``evaluate``) or
        ``classify`` (a row under ``configs/experiment/classify/``: train and test a
        classifier); also the name of the config it composes."""
        return experiment_task(self.experiment)

    @property
    def key(self) -> str:
        key = f"{self.experiment}/seed{self.seed}"
        if self.overrides:
            key += "/" + hashlib.sha1("\n".join(self.overrides).encode()).hexdigest()[:8]
        return key

    def train_overrides(self) -> list[str]:
        return [f"experiment={self.experiment}", f"seed={self.seed}", *self.overrides]


def seeded(keys: Sequence[str], seed: int) -> tuple[str, ...]:
    """``key=<seed>`` overrides of the keys a table varies with the seed."""
    return tuple(f"{key}={seed}" for key in keys)


# A sampler choice of a spec: ``(("group", "ddim"), ("steps", 50))``, hashable; () for the
# protocol's own sampler.
SamplerChoice = tuple[tuple[str, Any], ...]


def _settings(name: str, where: str, raw: Any, field: str, example: str) -> SamplerChoice:
    """A row's sampler or analysis settings (a mapping of scalars) as a sorted, hashable
    tuple; ``()`` for none."""
    if raw is None:
        return ()
    if isinstance(raw, Mapping) and all(
        isinstance(v, (str, int, float, bool)) for v in raw.values()
    ):
        return tuple(sorted((str(k), v) for k, v in raw.items()))
    raise _fail(name, where, f"{field} must be {example}, got {raw!r}")


def _sampler_choice(name: str, where: str, raw: Any) -> SamplerChoice:
    if isinstance(raw, str):  # a configs/sampler/ name
        return (("group", raw),)
    example = "a configs/sampler/ name or a mapping such as {group: dpm_solver, steps: 15}"
    return _settings(name, where, raw, "sampler", example)


def _analysis_choice(name: str, where: str, raw: Any) -> SamplerChoice:
    """A row's settings of its analysis columns (``{lora_scale: 0}``), hashable."""
    example = "a mapping of the analysis columns' settings to values, such as {lora_scale: 0}"
    return _settings(name, where, raw, "analysis", example + " (configs/analysis/)")


def sampler_text(choice: SamplerChoice) -> str:
    """A spec's sampler choice for people: ``dpm_solver, steps=15``; the protocol's own."""
    if not choice:
        return "the protocol's"
    items = dict(choice)
    group = items.pop("group", None)
    return ", ".join([*([str(group)] if group else []), *(f"{k}={v}" for k, v in items.items())])


def _override_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class EvalRef:
    """One evaluation of a run: one record."""

    run: RunRef
    eval: str
    sampler: SamplerChoice = ()
    guidance: float | None = None
    theta_g_only: bool = False
    analysis: str | None = None  # an analysis record (ltd-analyze) instead of an evaluation
    analysis_settings: SamplerChoice = ()  # the row's analysis settings, ((key, value), ...)
    varied: tuple[str, ...] = ()  # ``eval.<key>=<seed>`` of the table's ``vary:``

    @property
    def command(self) -> str:
        """What makes the record: ``"evaluate"`` or ``"analyze"``."""
        return "evaluate" if self.analysis is None else "analyze"

    def eval_overrides(self) -> list[str]:
        """The ``lt_diffusion.evaluate`` overrides of this evaluation (the protocol's sampler
        settings are changed key by key, so a row can change only the steps); for an analysis,
        the ``lt_diffusion.analyze`` overrides."""
        if self.analysis is not None:
            settings = [f"analysis.{k}={_override_value(v)}" for k, v in self.analysis_settings]
            return [f"analysis={self.analysis}", *settings]
        out = [f"eval={self.eval}", f"theta_g_only={str(self.theta_g_only).lower()}"]
        out += [f"eval.sampler.{k}={_override_value(v)}" for k, v in self.sampler]
        if self.guidance is not None:
            out.append(f"eval.guidance={self.guidance}")
        return [*out, *self.varied]


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    metric: str
    better: str = "lower"
    digits: int = 2
    tex: str | None = None  # the label as LaTeX, where ``label`` holds math


@dataclass
class Row:
    label: str
    experiments: dict[str, str]  # column key -> experiment
    published: dict[str, float | None]
    missing: str | None = None
    eval: str | None = None
    sampler: SamplerChoice = ()
    guidance: float | None = None
    theta_g_only: bool = False
    overrides: tuple[str, ...] = ()
    tex: str | None = None
    analysis: SamplerChoice = ()  # settings of the analysis columns' analysis for this row


@dataclass
class Block:
    label: str
    rows: list[Row]
    tex: str | None = None
    baseline: str = ""  # the label of the row every other row is compared with

    @property
    def baseline_row(self) -> Row:
        return next(r for r in self.rows if r.label == self.baseline)


@dataclass
class TableSpec:
    name: str
    title: str
    source: str
    seeds: list[int]
    eval: str
    sampler: SamplerChoice
    columns: list[Column]
    blocks: list[Block] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)  # experiments trained, not evaluated
    vary: list[str] = field(default_factory=list)  # config keys that take the seed too
    test: str = "t"  # the test behind the marks: paired t, or the sign-flip permutation test
    alpha: float = 0.05  # the table-wide level of the marks (Holm-adjusted)
    view: str = "values"

    def run_ref(self, experiment: str, seed: int, overrides: Sequence[str] = ()) -> RunRef:
        """The run of ``experiment`` at ``seed``, with the training keys the table varies."""
        varied = seeded([k for k in self.vary if not k.startswith("eval.")], seed)
        return RunRef(experiment, seed, (*overrides, *varied))

    def eval_varied(self, seed: int) -> tuple[str, ...]:
        return seeded([k for k in self.vary if k.startswith("eval.")], seed)

    @property
    def task(self) -> str:
        """``classify`` when every row is a classification row, else ``train``."""
        tasks = {
            experiment_task(e) for b in self.blocks for r in b.rows for e in r.experiments.values()
        }
        return "classify" if tasks == {"classify"} else "train"

    def cell_evals(self, row: Row, column: Column) -> list[EvalRef]:
        """The evaluations (one per seed) behind one cell; empty for a missing row."""
        if row.missing is not None:
            return []
        analysis = analysis_of(column.metric)
        experiment = row.experiments[column.key]
        if analysis is not None:  # one record per run and settings, whatever the column
            return [
                EvalRef(self.run_ref(experiment, seed, row.overrides), eval="",
                        analysis=analysis, analysis_settings=row.analysis)
                for seed in self.seeds
            ]  # fmt: skip
        return [
            EvalRef(
                run=self.run_ref(experiment, seed, row.overrides),
                eval=row.eval or self.eval,
                sampler=self.sampler + row.sampler,  # the row's keys come last and win
                guidance=row.guidance,
                theta_g_only=row.theta_g_only,
                varied=self.eval_varied(seed),
            )
            for seed in self.seeds
        ]

    def evaluations(self) -> list[EvalRef]:
        """Every record the table needs, each once, in table order."""
        seen: dict[EvalRef, None] = {}
        for block in self.blocks:
            for row in block.rows:
                for column in self.columns:
                    for ev in self.cell_evals(row, column):
                        seen.setdefault(ev, None)
        return list(seen)

    def runs(self) -> list[RunRef]:
        """Every training run, each once (a run evaluated twice is trained once): the required
        runs, then the evaluated ones."""
        required = [self.run_ref(e, seed) for e in self.requires for seed in self.seeds]
        return list(dict.fromkeys([*required, *(ev.run for ev in self.evaluations())]))

    def evaluations_by_run(self) -> dict[RunRef, list[EvalRef]]:
        """Each run's evaluations, in table order (a run with none is absent)."""
        out: dict[RunRef, list[EvalRef]] = {}
        for ev in self.evaluations():
            out.setdefault(ev.run, []).append(ev)
        return out


def _fail(name: str, where: str, what: str) -> TableSpecError:
    return TableSpecError(f"table {name}: {where}: {what}")


def _tex(name: str, where: str, raw: Mapping[str, Any]) -> str | None:
    """The optional ``tex:`` label, refused here when it could not compile: unbalanced braces
    or an odd number of ``$`` would break the whole ``.tex``, not just this label."""
    tex = raw.get("tex")
    if tex is None:
        return None
    tex = str(tex)
    plain = re.sub(r"\\.", "", tex)  # escaped characters (\{, \$, \\) do not count
    depth = 0
    for ch in plain:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0 or plain.count("$") % 2:
        raise _fail(
            name, where,
            f"tex label {tex!r} does not balance its braces {{...}} and $...$; fix its `tex:` "
            "(YAML: single-quote it so that backslashes stay as written)",
        )  # fmt: skip
    return tex


def _columns(name: str, raw: Any) -> list[Column]:
    if not raw:
        raise _fail(name, "columns", "list at least one column {key, label, metric, better}")
    cols = []
    for i, c in enumerate(raw):
        c = dict(c)
        where = f"column {i} ({c.get('key', '?')})"
        missing = [k for k in ("key", "metric") if k not in c]
        if missing:
            raise _fail(name, where, f"needs {missing}")
        if not metric_path_ok(c["metric"]):
            raise _fail(
                name, where,
                f"metric {c['metric']!r} is not a record metric path such as overall.fid, "
                "per_split.few.fid or per_class.class_001.kid, nor an analysis path such as "
                "analysis.concept_dominance.mean_share_gap (configs/analysis/<name>.yaml)",
            )  # fmt: skip
        if c.get("better", "lower") not in BETTER:
            raise _fail(name, where, f"better must be one of {BETTER}")
        cols.append(Column(str(c["key"]), str(c.get("label", c["key"])), str(c["metric"]),
                           str(c.get("better", "lower")), int(c.get("digits", 2)),
                           _tex(name, where, c)))  # fmt: skip
    keys = [c.key for c in cols]
    if len(set(keys)) != len(keys):
        raise _fail(name, "columns", f"column keys must be unique, got {keys}")
    return cols


def _row(name: str, raw: Mapping[str, Any], columns: list[Column], config_dir: Path) -> Row:
    raw = dict(raw)
    label = str(raw.get("label", "?"))
    where = f"row {label!r}"
    keys = [c.key for c in columns]
    exp = raw.get("experiment")
    if exp is None and raw.get("missing") is not None:
        experiments = {}
    elif isinstance(exp, str):
        experiments = dict.fromkeys(keys, exp)
    elif isinstance(exp, Mapping):
        experiments = {str(k): str(v) for k, v in exp.items()}
        if sorted(experiments) != sorted(keys):
            raise _fail(
                name, where, f"experiment maps columns {sorted(experiments)}, the table has {keys}"
            )
    else:
        raise _fail(
            name, where, "needs experiment: <row file under configs/experiment> (or one per column)"
        )
    pub = raw.get("published")
    if pub is None:
        published = dict.fromkeys(keys)
    elif isinstance(pub, Mapping):
        unknown = set(map(str, pub)) - set(keys)
        if unknown:
            raise _fail(name, where, f"published names unknown columns {sorted(unknown)}")
        published = {k: pub.get(k) for k in keys}
    else:
        pub = list(pub)
        if len(pub) != len(keys):
            raise _fail(
                name, where, f"published has {len(pub)} values for {len(keys)} columns {keys}"
            )
        published = dict(zip(keys, pub))
    missing = raw.get("missing")
    if missing is None:
        for e in set(experiments.values()):
            if not (config_dir / "experiment" / f"{e}.yaml").is_file():
                raise _fail(
                    name, where,
                    f"experiment {e!r} has no file {config_dir / 'experiment' / (e + '.yaml')}: "
                    "fix the name, add the row file, or mark the row `missing: <reason>`",
                )  # fmt: skip
    return Row(
        label=label,
        experiments=experiments,
        published={k: None if v is None else float(v) for k, v in published.items()},
        missing=None if missing is None else str(missing),
        eval=raw.get("eval"),
        sampler=_sampler_choice(name, where, raw.get("sampler")),
        guidance=None if raw.get("guidance") is None else float(raw["guidance"]),
        theta_g_only=bool(raw.get("theta_g_only", False)),
        overrides=tuple(str(o) for o in raw.get("overrides", ())),
        tex=_tex(name, where, raw),
        analysis=_analysis_choice(name, where, raw.get("analysis")),
    )


def load_table(
    node: Mapping[str, Any] | DictConfig, config_dir: str | Path = CONFIG_DIR
) -> TableSpec:
    """A validated :class:`TableSpec` from a table config node (``cfg.table``)."""
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = str(raw.get("name") or "?")
    for key in ("name", "columns", "blocks"):
        if not raw.get(key):
            raise _fail(name, key, "missing")
    seeds = [int(s) for s in raw.get("seeds", [0])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise _fail(name, "seeds", f"give at least one seed, each once (got {seeds})")
    columns = _columns(name, raw["columns"])
    blocks = [_block(name, b, columns, Path(config_dir)) for b in raw["blocks"]]
    requires = [str(e) for e in raw.get("requires") or []]
    for e in requires:
        if not (Path(config_dir) / "experiment" / f"{e}.yaml").is_file():
            raise _fail(name, "requires", f"no experiment {e!r} under configs/experiment/")
    return TableSpec(
        name=name,
        title=str(raw.get("title", name)),
        source=str(raw.get("source", "")),
        seeds=seeds,
        eval=str(raw.get("eval", "cm_paper")),
        sampler=_sampler_choice(name, "sampler", raw.get("sampler")),
        columns=columns,
        blocks=blocks,
        requires=requires,
        vary=_vary(name, raw.get("vary")),
        **_statistics(name, raw, len(seeds)),
    )


def _block(name: str, raw: Mapping[str, Any], columns: list[Column], config_dir: Path) -> Block:
    """A block with its rows and its baseline (named, or its first row)."""
    label = str(raw.get("label", ""))
    where = f"block {label!r}"
    if not raw.get("rows"):
        raise _fail(name, where, "list its rows")
    rows = [_row(name, r, columns, config_dir) for r in raw["rows"]]
    labels = [r.label for r in rows]
    baseline = str(raw.get("baseline", labels[0]))
    if baseline not in labels:
        raise _fail(
            name, where,
            f"baseline {baseline!r} names no row of this block; name one of {labels} (or leave "
            "baseline out: the block's first row)",
        )  # fmt: skip
    if labels.count(baseline) > 1:
        raise _fail(name, where, f"baseline {baseline!r} names {labels.count(baseline)} rows: "
                    "give the rows distinct labels")  # fmt: skip
    if next(r for r in rows if r.label == baseline).missing is not None:
        raise _fail(name, where, f"baseline {baseline!r} is a missing row: name a row that runs")
    return Block(label, rows, _tex(name, where, raw), baseline)


def _vary(name: str, raw: Any) -> list[str]:
    """The config keys a table varies with the seed (checked against the composed configs
    when the table is resolved)."""
    keys = [] if raw is None else raw
    if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
        raise _fail(name, "vary", f"give a list of config keys, e.g. [imbalance.seed], got {raw!r}")
    if "seed" in keys or len(set(keys)) != len(keys):
        raise _fail(
            name, "vary", f"list each key once, not `seed` itself (it always varies): {keys}"
        )
    return list(keys)


def _statistics(name: str, raw: Mapping[str, Any], n_seeds: int) -> dict[str, Any]:
    """The spec's test, level and view, checked."""
    from lt_diffusion.tables.statistics import PERMUTATION_MIN_PAIRS, TESTS

    test, view = str(raw.get("test", "t")), str(raw.get("view", "values"))
    if test not in TESTS:
        raise _fail(name, "test", f"{test!r} is not one of {TESTS}")
    if test == "permutation" and n_seeds < PERMUTATION_MIN_PAIRS:
        raise _fail(
            name, "test",
            f"the permutation test needs at least {PERMUTATION_MIN_PAIRS} seeds (the table has "
            f"{n_seeds}): add seeds or use test: t",
        )  # fmt: skip
    if view not in VIEWS:
        raise _fail(name, "view", f"{view!r} is not one of {VIEWS} (table.view=diff)")
    try:
        alpha = float(raw.get("alpha", 0.05))
    except (TypeError, ValueError):
        alpha = -1.0
    if not 0 < alpha < 1:
        raise _fail(name, "alpha", f"must be a level between 0 and 1, got {raw.get('alpha')!r}")
    return {"test": test, "alpha": alpha, "view": view}


def available_tables(config_dir: str | Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir) / "table").glob("*.yaml"))


def load_table_by_name(name: str, config_dir: str | Path = CONFIG_DIR) -> TableSpec:
    path = Path(config_dir) / "table" / f"{name}.yaml"
    if not path.is_file():
        raise TableSpecError(
            f"unknown table {name!r}; available: {', '.join(available_tables(config_dir))}"
        )
    return load_table(OmegaConf.load(path), config_dir)


# Moved to lt_diffusion.tables.resolution (importable from here for one release, with a warning).
__getattr__ = moved(__name__, ("lt_diffusion.tables.resolution",))
