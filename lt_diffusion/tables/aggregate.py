"""Aggregate records into a table: per cell the values over seeds, mean ± std, the published
number and our difference, the status of the cell, and best / second best per column inside a
block (as the papers mark them). Built from records only, never from logs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lt_diffusion.evaluation.record import RecordError, class_index, read_record
from lt_diffusion.tables.spec import Column, ResolvedRun, Row, TableSpec

STATUSES = ("ok", "partial", "pending", "failed", "missing", "invalid")


def metric_value(record: Mapping[str, Any], path: str) -> float | None:
    """The number at ``path`` (``overall.fid``, ``per_split.few.kid``,
    ``per_class.class_001.fid``) of a record; ``None`` when the record holds none there."""
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
    value = entry.get(parts[-1])
    return None if value is None or not math.isfinite(float(value)) else float(value)


@dataclass
class Cell:
    """One (row, column) of the table."""

    status: str
    values: list[float] = field(default_factory=list)
    n_expected: int = 0
    published: float | None = None
    log: str | None = None  # failed: the failed job's log
    note: str | None = None  # missing: why; invalid: what is wrong with a record
    rank: int | None = None  # 1 best, 2 second best in its block and column

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


@dataclass
class TableResult:
    spec: TableSpec
    # block label -> list of (row, {column key: Cell})
    blocks: list[tuple[str, list[tuple[Row, dict[str, Cell]]]]]

    @property
    def columns(self) -> list[Column]:
        return self.spec.columns


def _cell(
    spec: TableSpec,
    row: Row,
    column: Column,
    records: Mapping[Any, Path],
    failures: Mapping[str, str],
) -> Cell:
    published = row.published.get(column.key)
    if row.missing is not None:
        return Cell("missing", published=published, note=row.missing)
    evals = spec.cell_evals(row, column)
    values, failed_log, invalid = [], None, None
    for ev in evals:
        path = records.get(ev)
        if path is not None and path.is_file():
            try:
                value = metric_value(read_record(path), column.metric)
            except (RecordError, KeyError) as err:
                invalid = f"{path}: {err}"
                continue
            if value is not None:
                values.append(value)
        elif ev.run.key in failures:
            failed_log = failures[ev.run.key]
    n = len(evals)
    if len(values) == n:
        status = "ok"
    elif values:
        status = "partial"
    elif invalid:
        status = "invalid"
    elif failed_log:
        status = "failed"
    else:
        status = "pending"
    return Cell(status, values, n, published, failed_log, invalid)


def _mark_ranks(rows: list[tuple[Row, dict[str, Cell]]], columns: Sequence[Column]) -> None:
    for column in columns:
        cells = [c[column.key] for _, c in rows if c[column.key].mean is not None]
        sign = 1.0 if column.better == "lower" else -1.0
        # Ties share a rank; a rank exists only where there is something to compare with.
        distinct = sorted({round(sign * c.mean, 12) for c in cells})
        if len(cells) < 2:
            continue
        for cell in cells:
            pos = distinct.index(round(sign * cell.mean, 12))
            cell.rank = pos + 1 if pos < 2 else None


def collect(
    spec: TableSpec, resolved: Sequence[ResolvedRun], failures: Mapping[str, str] | None = None
) -> TableResult:
    """The table from the records of ``resolved`` (``failures``: run key -> its job's log)."""
    records = {ev: path for r in resolved for ev, path in r.records.items()}
    failures = failures or {}
    blocks = []
    for block in spec.blocks:
        rows = [
            (row, {c.key: _cell(spec, row, c, records, failures) for c in spec.columns})
            for row in block.rows
        ]
        _mark_ranks(rows, spec.columns)
        blocks.append((block.label, rows))
    return TableResult(spec, blocks)
