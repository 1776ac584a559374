"""Aggregate records into a table: per cell the values over seeds, mean ± std, the published
number and our difference, the status of the cell, best / second best per column inside a
block (as the papers mark them), and each row's paired difference to its block's baseline with
its interval, p-values and mark (:mod:`lt_diffusion.tables.statistics`). Built from records
only, never from logs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lt_diffusion.records.base import RecordError, class_index, read_record
from lt_diffusion.tables.resolution import ResolvedRun
from lt_diffusion.tables.spec import Block, Column, EvalRef, Row, TableSpec, analysis_of
from lt_diffusion.tables.statistics import (
    POWER,
    PairedDifference,
    detectable_difference,
    holm,
    paired_difference,
    pooled_sd,
)

STATUSES = ("ok", "partial", "pending", "failed", "unavailable", "missing", "invalid")


def metric_entry(record: Mapping[str, Any], path: str) -> tuple[float | None, str | None]:
    """The number at ``path`` (``overall.fid``, ``per_split.few.kid``,
    ``per_class.class_001.fid``) of a record, or ``None`` with the reason there is none: the
    record's ``<metric>_unavailable`` (e.g. IS without Inception logits), else that the record
    does not hold the path (its protocol did not compute it). An analysis path
    (``analysis.<name>.<path>``) reads the analysis record's results."""
    if analysis_of(path) is not None:
        return _analysis_entry(record, path)
    parts = path.split(".")
    metrics = record["metrics"]
    if parts[0] == "overall":
        entry = metrics.get("overall") or {}
    elif parts[0] == "per_split":
        entry = metrics.get("per_split", {}).get(parts[1]) or {}
    else:
        want = class_index(parts[1])
        entry = next(
            (e for k, e in metrics.get("per_class", {}).items() if class_index(k) == want), {}
        )
    name = parts[-1]
    value = entry.get(name)
    if value is not None and math.isfinite(float(value)):
        return float(value), None
    if value is not None:
        return None, f"not finite ({value})"
    return None, entry.get(f"{name}_unavailable") or f"the record holds no {path}"


def _analysis_entry(record: Mapping[str, Any], path: str) -> tuple[float | None, str | None]:
    """The number at ``analysis.<name>.<a>.<b>`` = ``results[a][b]`` of an analysis record. A
    null number's reason is the ``unavailable`` note of the results entry named by a part of
    the path (``frequent_dominates.clip``: ``results.clip.unavailable``), where there is one."""
    parts = path.split(".")[2:]
    results = record["results"]
    value: Any = results
    for part in parts:
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(float(value)):
            return float(value), None
        return None, f"not finite ({value})"
    notes = [results[p]["unavailable"] for p in parts
             if isinstance(results.get(p), Mapping) and results[p].get("unavailable")]  # fmt: skip
    if notes:
        return None, str(notes[0])
    return None, f"the analysis record holds no number at {path}"


def _eval_std(record: Mapping[str, Any], path: str) -> float | None:
    """The spread of the number at ``path`` over the record's generation sets
    (``<metric>_std`` of ``eval.repeats``), when the record measured it."""
    if analysis_of(path) is not None:
        return None
    where, _, name = path.rpartition(".")
    try:
        value, _ = metric_entry(record, f"{where}.{name}_std")
    except (RecordError, KeyError):
        return None
    return value


def metric_value(record: Mapping[str, Any], path: str) -> float | None:
    """The number at ``path`` of a record; ``None`` when the record holds none there."""
    return metric_entry(record, path)[0]


@dataclass
class Cell:
    """One (row, column) of the table.

    Status: ``ok`` (every seed has its number), ``partial`` (some seeds do), and without a
    number ``pending`` (no record yet), ``failed`` (the runs' jobs failed), ``unavailable`` (the
    records exist but cannot hold this metric, ``note`` says why), ``missing`` (the project
    cannot run the row), ``invalid`` (a record is malformed).
    """

    status: str
    by_seed: dict[int, float] = field(default_factory=dict)  # seed -> the record's number
    n_expected: int = 0
    published: float | None = None
    failed: dict[int, str] = field(default_factory=dict)  # seed -> its failed job's log
    note: str | None = None  # missing / unavailable: why; invalid: what is wrong with a record
    rank: int | None = None  # 1 best, 2 second best among the complete cells of its block
    # Against the block's baseline row (None in the baseline row and where nothing pairs):
    paired: PairedDifference | None = None
    p_adj: float | None = None  # the marks' p-value, Holm-adjusted over the table
    mark: str | None = None  # "better" | "worse": significantly, at the table's level
    baseline: bool = False  # the cell is its block's baseline
    # seed -> the std of the metric over its record's generation sets (eval.repeats > 1)
    eval_std: dict[int, float] = field(default_factory=dict)

    @property
    def values(self) -> list[float]:
        return list(self.by_seed.values())

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.published is None:
            return None
        return self.mean - self.published

    @property
    def log(self) -> str | None:
        """The failed seeds' logs, ``seed <s>: <log>`` joined by ``; ``."""
        return "; ".join(f"seed {s}: {log}" for s, log in self.failed.items()) or None


@dataclass
class Statistics:
    """What a table's marks rest on: the test, the level, the number of comparisons Holm
    adjusts for, per column the smallest difference the seeds could detect (80% power at the
    Bonferroni level ``alpha / comparisons``, Holm's strictest step, from the pooled paired
    spread) and the (block, column) pairs whose best mean is not distinguishable from the
    second best."""

    test: str
    alpha: float
    comparisons: int
    detectable: dict[str, float | None] = field(default_factory=dict)
    indistinct: list[tuple[str, str]] = field(default_factory=list)
    power: float = POWER
    # column key -> the mean over its records of one evaluation's std (eval.repeats > 1)
    eval_noise: dict[str, float] = field(default_factory=dict)


@dataclass
class TableResult:
    spec: TableSpec
    # per block of the spec: its rows, each with {column key: Cell}
    blocks: list[tuple[Block, list[tuple[Row, dict[str, Cell]]]]]
    # What the table command added to every run / evaluation (not the sweep's own paths): the
    # cells were made under these settings, whatever the block labels say.
    train_overrides: tuple[str, ...] = ()
    eval_overrides: tuple[str, ...] = ()
    # The classifier-free guidance weights and the samplers the records were made with.
    guidance: tuple[float, ...] = ()
    samplers: tuple[str, ...] = ()
    # What the records compared with (each record's reference, in words).
    references: tuple[str, ...] = ()
    statistics: Statistics | None = None

    @property
    def columns(self) -> list[Column]:
        return self.spec.columns

    @property
    def testable(self) -> bool:
        """Whether the table has the seeds for a paired test (two or more)."""
        return len(self.spec.seeds) >= 2


class _Records:
    """Each record read once: its content, or the error that makes it invalid."""

    def __init__(self) -> None:
        self._read: dict[Path, dict[str, Any] | str] = {}

    def __call__(self, path: Path) -> dict[str, Any] | str:
        if path not in self._read:
            try:
                self._read[path] = read_record(path)
            except RecordError as err:
                self._read[path] = f"{path}: {err}"
        return self._read[path]

    def samplers(self) -> tuple[str, ...]:
        return tuple(sorted({
            str(r["sampler"]["name"])
            for r in self._evaluations() if r["sampler"].get("name")
        }))  # fmt: skip

    def guidance(self) -> tuple[float, ...]:
        return tuple(sorted({
            float(r["sampler"]["guidance"]) for r in self._evaluations()
        }))  # fmt: skip

    def references(self) -> tuple[str, ...]:
        """Each record's reference in a few words: the first clause of its description, or
        the statistics file it read."""
        out = set()
        for r in self._evaluations():
            ref = r.get("reference") or {}
            if ref.get("origin") == "file":
                out.add(f"the statistics file {ref.get('path')} ({ref.get('description')})")
            elif ref.get("description"):
                out.add(str(ref["description"]).split(";")[0])
        return tuple(sorted(out))

    def _evaluations(self) -> list[dict[str, Any]]:
        """The evaluation records read (analysis and classification records have no sampler of
        their own)."""
        return [r for r in self._read.values() if isinstance(r, dict) and "sampler" in r]


def _cell(
    spec: TableSpec,
    row: Row,
    column: Column,
    runs: Mapping[EvalRef, ResolvedRun],
    failures: Mapping[str, str],
    read: _Records,
) -> Cell:
    published = row.published.get(column.key)
    if row.missing is not None:
        return Cell("missing", published=published, note=row.missing)
    evals = spec.cell_evals(row, column)
    values: dict[int, float] = {}
    eval_std: dict[int, float] = {}
    failed: dict[int, str] = {}
    unavailable, invalid, stale = None, None, None
    for ev in evals:
        run = runs.get(ev)
        path = run.records[ev] if run is not None else None
        record = read(path) if path is not None and path.is_file() else None
        if isinstance(record, dict) and (why := run.stale_reason(ev, record)) is not None:
            stale, record = why, None  # made under other settings: as if not made yet
        if record is not None:
            if isinstance(record, str):
                invalid = record
                continue
            try:
                value, why = metric_entry(record, column.metric)
            except (RecordError, KeyError) as err:
                invalid = f"{path}: {err}"
                continue
            if value is None:
                unavailable = why
            else:
                values[ev.run.seed] = value
                noise = _eval_std(record, column.metric)
                if noise is not None:
                    eval_std[ev.run.seed] = noise
        elif ev.run.key in failures:
            failed[ev.run.seed] = failures[ev.run.key]
    n = len(evals)
    if len(values) == n:
        status, note = "ok", None
    elif values:
        status, note = "partial", invalid or unavailable
    elif invalid:
        status, note = "invalid", invalid
    elif unavailable:
        # A record exists and has no number: rerunning the seeds still pending will not give one.
        status, note = "unavailable", unavailable
    elif failed:
        status, note = "failed", None
    else:
        status, note = "pending", stale
    return Cell(status, values, n, published, failed, note, eval_std=eval_std)


def _mark_ranks(rows: list[tuple[Row, dict[str, Cell]]], columns: Sequence[Column]) -> None:
    for column in columns:
        # Only complete cells compete: a mean over some of the seeds is not comparable.
        cells = [c[column.key] for _, c in rows if c[column.key].status == "ok"]
        if len(cells) < 2:  # a rank exists only where there is something to compare with
            continue
        sign = 1.0 if column.better == "lower" else -1.0
        distinct = sorted({round(sign * c.mean, 12) for c in cells})  # ties share a rank
        for cell in cells:
            pos = distinct.index(round(sign * cell.mean, 12))
            cell.rank = pos + 1 if pos < 2 else None


def _compare_with_baselines(
    spec: TableSpec, blocks: list[tuple[Block, list[tuple[Row, dict[str, Cell]]]]]
) -> Statistics:
    """Each cell's paired difference to its block's baseline, the p-values adjusted over the
    whole table (Holm), the marks, and what the table could detect."""
    tested: list[tuple[Cell, Column]] = []
    for block, rows in blocks:
        base = next(cells for row, cells in rows if row.label == block.baseline)
        for row, cells in rows:
            for col in spec.columns:
                cell, ref = cells[col.key], base[col.key]
                if row.label == block.baseline:
                    cell.baseline = True
                elif cell.by_seed and ref.by_seed:
                    cell.paired = paired_difference(cell.by_seed, ref.by_seed)
                    if cell.paired.p(spec.test) is not None:
                        tested.append((cell, col))
    adjusted = holm([cell.paired.p(spec.test) for cell, _ in tested])  # type: ignore[union-attr]
    for (cell, col), p_adj in zip(tested, adjusted):
        cell.p_adj = p_adj
        diff = cell.paired.diff  # type: ignore[union-attr]
        if p_adj < spec.alpha and diff:
            cell.mark = "better" if (diff < 0) == (col.better == "lower") else "worse"
    stats = Statistics(spec.test, spec.alpha, len(tested))
    for col in spec.columns:
        noise = [v for _, rows in blocks for _, c in rows for v in c[col.key].eval_std.values()]
        if noise:
            stats.eval_noise[col.key] = statistics.fmean(noise)
    for col in spec.columns:
        spread = pooled_sd([c.paired for c, k in tested if k.key == col.key])  # type: ignore[misc]
        stats.detectable[col.key] = (
            None
            if spread is None
            else detectable_difference(spread, len(spec.seeds), spec.alpha / len(tested))
        )
    for block, rows in blocks:
        for col in spec.columns:
            best, second = ([c[col.key] for _, c in rows if c[col.key].rank == k] for k in (1, 2))
            if len(best) != 1 or len(second) != 1:  # ties: nothing to distinguish
                continue
            p = paired_difference(best[0].by_seed, second[0].by_seed).p(spec.test)
            if p is not None and p >= spec.alpha:
                stats.indistinct.append((block.label, col.key))
    return stats


def collect(
    spec: TableSpec,
    resolved: Sequence[ResolvedRun],
    failures: Mapping[str, str] | None = None,
    train_overrides: Sequence[str] = (),
    eval_overrides: Sequence[str] = (),
) -> TableResult:
    """The table from the records of ``resolved`` (``failures``: run key -> its job's log;
    ``train_overrides`` / ``eval_overrides``: what the runs were made with beyond the spec,
    shown with the table)."""
    runs = {ev: r for r in resolved for ev in r.records}
    failures = failures or {}
    read = _Records()
    blocks = []
    for block in spec.blocks:
        rows = [
            (row, {c.key: _cell(spec, row, c, runs, failures, read) for c in spec.columns})
            for row in block.rows
        ]
        _mark_ranks(rows, spec.columns)
        blocks.append((block, rows))
    return TableResult(
        spec,
        blocks,
        tuple(train_overrides),
        tuple(eval_overrides),
        read.guidance(),
        read.samplers(),
        references=read.references(),
        statistics=_compare_with_baselines(spec, blocks),
    )
