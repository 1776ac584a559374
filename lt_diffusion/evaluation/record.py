"""One JSON record per evaluated run (DESIGN.md, Records). Tables are built only from these.

Schema (version :data:`SCHEMA_VERSION`); keys marked * are required and validated::

    schema*          int, SCHEMA_VERSION
    code_version*    str, ``git describe`` of the source tree, else the package version
    created          str, ISO 8601 time of writing
    identity*        dict: digest* (names the file), train, protocol, generation: digests of
                     the settings that define the record (lt_diffusion.utils.identity)
    config*          dict, the composed (resolved) config of the evaluated run
    dataset*         dict: name*, class_counts* (training images per class, class 0 the
                     largest), splits* (split of each class: many | medium | few), class_names,
                     ... (what LongTailDataModule.info() gives)
    checkpoint*      dict: path*, step* (global step; EMA weights are evaluated)
    sampler*         dict: the sampler node that ran (name, its settings under ``sampler``, incl.
                     clip_denoised), guidance* (the classifier-free guidance weight used; None
                     for an image folder that does not state it)
    protocol*        dict: the eval protocol config (name, counts, kid/pr/is settings, seed)
    extractor*       dict: name, weights (file), weights_sha256*, has_logits*, is_unavailable
    metrics*         dict:
        overall*     entry or {} (not evaluated)
        per_split*   {many | medium | few: entry}
        per_class*   {"<index>" or "class_<index:03d>": entry}
    ...              anything else (timings, generated_per_class) is kept as is

    entry: n_generated*, n_real* (images in this comparison); fid, kid, precision, recall, is:
    a float, or None with ``<metric>_unavailable`` saying why (e.g. IS without logits);
    kid_std, kid_subset_size* (with kid: the size actually used), kid_subsets; pr_k* (with
    precision or recall); is_std, is_splits; notes (list of str).

:func:`lt_diffusion.evaluation.metrics.compare_features` produces entries in this form.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lt_diffusion import runtime
from lt_diffusion.utils.io import atomic_write_json

SCHEMA_VERSION = 2  # 2: identity (settings digests); the sampler that ran, from the protocol
SPLIT_NAMES = ("many", "medium", "few")
METRIC_NAMES = ("fid", "kid", "precision", "recall", "is")
REQUIRED = (
    "schema",
    "code_version",
    "identity",
    "config",
    "dataset",
    "checkpoint",
    "sampler",
    "protocol",
    "extractor",
    "metrics",
)
_CLASS_KEY = re.compile(r"^(?:class_)?(\d+)$")


def record_filename(
    eval_name: str,
    sampler_name: str,
    guidance: float | None,
    theta_g_only: bool = False,
    digest: str | None = None,
) -> str:
    """The file name of a run's record under ``<run_dir>/records/``: the protocol, what sampled
    (``ddim20``, or ``images`` for a folder), the guidance weight and the model variant for the
    reader, and the evaluation's settings digest (:mod:`lt_diffusion.utils.identity`), so that
    evaluations under other settings never overwrite or pass for each other."""
    suffix = "-theta_g" if theta_g_only else ""
    weight = "" if guidance is None else f"-w{float(guidance):g}"
    tail = f"-{digest}" if digest else ""
    return f"{eval_name}-{sampler_name}{weight}{suffix}{tail}.json"


class RecordError(ValueError):
    """A record is malformed (or not a record at all)."""


def class_index(key: str | int) -> int:
    """Class index of a ``per_class`` key (``"3"`` or ``"class_003"``)."""
    m = _CLASS_KEY.match(str(key))
    if not m:
        raise RecordError(f"per_class key {key!r} is not a class index ('3' or 'class_003')")
    return int(m.group(1))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(entry: Any, where: str) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{where} is not a mapping"]
    problems = []
    for key in ("n_generated", "n_real"):
        if not _is_count(entry.get(key)):
            problems.append(f"{where}.{key} must be a count, got {entry.get(key)!r}")
    for m in METRIC_NAMES:
        if m not in entry:
            continue
        v = entry[m]
        if v is None:
            if not isinstance(entry.get(f"{m}_unavailable"), str):
                problems.append(f"{where}.{m} is None without {m}_unavailable saying why")
        elif not _is_number(v):
            problems.append(f"{where}.{m} must be a finite number or None, got {v!r}")
    if "kid" in entry and not _is_count(entry.get("kid_subset_size")):
        problems.append(f"{where} has kid without the kid_subset_size used")
    if ("precision" in entry or "recall" in entry) and not _is_count(entry.get("pr_k")):
        problems.append(f"{where} has precision/recall without pr_k")
    return problems


def validate(record: Any, source: str = "record") -> dict[str, Any]:
    """Raise :class:`RecordError` listing every problem; returns the record when it is valid."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{source} is not a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"{source} is not an lt-diffusion record: it lacks {missing}")
    problems: list[str] = []
    if record["schema"] != SCHEMA_VERSION:
        problems.append(
            f"schema {record['schema']!r} is not {SCHEMA_VERSION} (written by another version)"
        )
    ds = record["dataset"]
    n_classes = None
    if not isinstance(ds, Mapping) or not {"name", "class_counts", "splits"} <= set(ds):
        problems.append("dataset must hold name, class_counts and splits")
    else:
        counts, splits = ds["class_counts"], ds["splits"]
        if not isinstance(counts, list) or not all(_is_count(c) for c in counts):
            problems.append("dataset.class_counts must be a list of counts")
        elif not isinstance(splits, list) or len(splits) != len(counts):
            problems.append("dataset.splits must list one split per class")
        elif any(s not in SPLIT_NAMES for s in splits):
            problems.append(f"dataset.splits must be among {SPLIT_NAMES}")
        else:
            n_classes = len(counts)
    ident = record["identity"]
    if not isinstance(ident, Mapping) or not isinstance(ident.get("digest"), str):
        problems.append("identity must hold the settings digest")
    ck = record["checkpoint"]
    if not isinstance(ck, Mapping) or "path" not in ck or "step" not in ck:
        problems.append("checkpoint must hold path and step")
    if not isinstance(record["sampler"], Mapping) or "guidance" not in record["sampler"]:
        problems.append("sampler must hold the guidance weight used")
    ex = record["extractor"]
    if not isinstance(ex, Mapping) or not {"weights_sha256", "has_logits"} <= set(ex):
        problems.append("extractor must hold weights_sha256 and has_logits")
    metrics = record["metrics"]
    if not isinstance(metrics, Mapping) or not {"overall", "per_split", "per_class"} <= set(
        metrics
    ):
        problems.append("metrics must hold overall, per_split and per_class")
    else:
        if metrics["overall"]:
            problems += _check_entry(metrics["overall"], "metrics.overall")
        per_split = metrics["per_split"]
        if not isinstance(per_split, Mapping):
            problems.append("metrics.per_split is not a mapping")
        else:
            for name, entry in per_split.items():
                if name not in SPLIT_NAMES:
                    problems.append(f"metrics.per_split.{name} is not one of {SPLIT_NAMES}")
                problems += _check_entry(entry, f"metrics.per_split.{name}")
        per_class = metrics["per_class"]
        if not isinstance(per_class, Mapping):
            problems.append("metrics.per_class is not a mapping")
        else:
            for name, entry in per_class.items():
                try:
                    c = class_index(name)
                    if n_classes is not None and c >= n_classes:
                        problems.append(f"metrics.per_class.{name}: no class {c}")
                except RecordError as err:
                    problems.append(str(err))
                problems += _check_entry(entry, f"metrics.per_class.{name}")
    if problems:
        raise RecordError(f"{source} is not a valid record: " + "; ".join(problems))
    return dict(record)


def build_record(
    *,
    config: dict[str, Any],
    dataset: dict[str, Any],
    checkpoint: dict[str, Any],
    sampler: dict[str, Any],
    protocol: dict[str, Any],
    extractor: dict[str, Any],
    metrics: dict[str, Any],
    identity: dict[str, Any],
    code_version: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A validated record (see the module docstring). ``metrics`` may omit ``per_split`` /
    ``per_class`` (stored as {}); ``extra`` keys (timings, ...) are kept."""
    metrics = {"overall": {}, "per_split": {}, "per_class": {}, **metrics}
    record = {
        "schema": SCHEMA_VERSION,
        "code_version": code_version if code_version is not None else runtime.code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "identity": identity,
        "config": config,
        "dataset": dataset,
        "checkpoint": checkpoint,
        "sampler": sampler,
        "protocol": protocol,
        "extractor": extractor,
        "metrics": metrics,
        **extra,
    }
    return validate(record)


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Validate, serialise (strict JSON: no NaN), then write atomically; any failure leaves an
    existing file at ``path`` untouched."""
    validate(record, f"record for {path}")
    try:
        return atomic_write_json(path, record, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RecordError(f"record for {path} cannot be written as JSON: {err}") from err


def read_record(path: str | Path) -> dict[str, Any]:
    """Read and validate a record; :class:`RecordError` says what is wrong."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(
            f"{path} is not a readable record ({err}): re-run the evaluation"
        ) from err
    return validate(record, str(path))
