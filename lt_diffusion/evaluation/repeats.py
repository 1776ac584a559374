"""Evaluation noise: ``eval.repeats=k`` evaluates ``k`` independent generation sets of one
checkpoint (other noise seeds, the same real set) and records each metric's mean over the sets
and its standard deviation (``<metric>_std``): the spread one number of the protocol carries."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

from lt_diffusion.evaluation.metrics import METRICS

# Set r > 0 generates with seed + r * STRIDE: far from the seeds a table varies (0, 1, 2, ...).
STRIDE = 1_000_003


def noise_seeds(seed: int, repeats: int) -> list[int]:
    """The generation seeds of ``repeats`` sets; the first is the protocol's own seed, so one
    repeat is the ordinary evaluation."""
    if repeats < 1:
        raise ValueError(f"eval.repeats={repeats}: give the number of generation sets, 1 or more")
    return [int(seed) + r * STRIDE for r in range(repeats)]


def _entries(metrics: dict[str, Any]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """``(section, name, entry)`` of every comparison of a record's metrics."""
    if metrics.get("overall"):
        yield "overall", None, metrics["overall"]
    for section in ("per_split", "per_class"):
        for name, entry in metrics.get(section, {}).items():
            yield section, name, entry


def merge_repeats(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One protocol result from the results of several generation sets: each registered
    metric's mean over the sets and its ``<metric>_std`` (sample std), the other entries and
    settings of the first set, summed timings, and ``repeats``: the seeds and every set's
    values."""
    first = results[0]
    merged = {**first, "metrics": _copy(first["metrics"])}
    values: dict[str, Any] = {"overall": {}, "per_split": {}, "per_class": {}}
    sets = [dict(((s, n), e) for s, n, e in _entries(r["metrics"])) for r in results]
    for section, name, entry in _entries(merged["metrics"]):
        kept = values[section] if name is None else values[section].setdefault(name, {})
        for metric in METRICS:
            got = [s[(section, name)].get(metric) for s in sets]
            if metric not in entry or any(v is None for v in got):
                continue
            entry[metric] = statistics.fmean(got)
            entry[f"{metric}_std"] = statistics.stdev(got)
            kept[metric] = got
    merged["repeats"] = {"k": len(results), "noise_seeds": list(seeds), "values": values}
    merged["seconds"] = {
        key: sum(r.get("seconds", {}).get(key, 0.0) for r in results) for key in first["seconds"]
    }
    return merged


def _copy(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "overall": dict(metrics.get("overall") or {}),
        "per_split": {k: dict(v) for k, v in metrics.get("per_split", {}).items()},
        "per_class": {k: dict(v) for k, v in metrics.get("per_class", {}).items()},
    }
