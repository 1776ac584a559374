"""The record family (DESIGN.md, Records): what every record has, how records are validated,
written and read, and which model each record ``kind`` has. Tables are built only from records.

A record is a typed model, validated on write and on read. Each kind registers its model (and
how its older schemas are upgraded) from its own package: the evaluation record
(:mod:`lt_diffusion.evaluation.record`, records without ``kind``) and the classifier's
(:mod:`lt_diffusion.classification.record`, ``kind: classification``). Metric entries are
checked against the metric registry (:mod:`lt_diffusion.records.metrics`): a value is a finite
number, or None with ``<metric>_unavailable`` saying why, and comes with the settings it depends
on (``kid_subset_size`` with KID, ``pr_k`` with precision / recall).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    model_validator,
)

from lt_diffusion import runtime
from lt_diffusion.records.metrics import METRICS
from lt_diffusion.utils.io import atomic_write_json

# 2: identity (settings digests); the sampler that ran, from the protocol.
# 3: extractors (per feature space), reference, conventions; small-sample entries.
SCHEMA_VERSION = 3
SPLIT_NAMES = ("many", "medium", "few")
CLASS_KEY = re.compile(r"^(?:class_)?(\d+)$")
Split = Literal["many", "medium", "few"]


class RecordError(ValueError):
    """A record is malformed (or not a record at all)."""


def class_index(key: str | int) -> int:
    """Class index of a ``per_class`` key (``"3"`` or ``"class_003"``)."""
    m = CLASS_KEY.match(str(key))
    if not m:
        raise RecordError(f"per_class key {key!r} is not a class index ('3' or 'class_003')")
    return int(m.group(1))


class Open(BaseModel):
    """A part of the record that may hold more than its required keys (kept as they are)."""

    model_config = ConfigDict(extra="allow")


class MetricEntry(Open):
    """One comparison's metrics (the extra keys, checked by :func:`check_metric_values`) and
    its notes; each record kind adds the counts it compared."""

    notes: list[str] = []

    @model_validator(mode="after")
    def _metrics(self) -> MetricEntry:
        check_metric_values(self.model_extra or {})
        return self


def check_metric_values(values: Mapping[str, Any]) -> None:
    """Every registered metric among ``values`` is a finite number, or None with
    ``<metric>_unavailable`` saying why, and comes with the settings it requires."""
    for name, metric in METRICS.items():
        if name not in values:
            continue
        v = values[name]
        if v is None:
            if not isinstance(values.get(f"{name}_unavailable"), str):
                raise ValueError(f"{name} is None without {name}_unavailable saying why")
        elif (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or v != v
            or abs(v) == float("inf")
        ):
            raise ValueError(f"{name} must be a finite number or None, got {v!r}")
        missing = [k for k in metric.requires if not isinstance(values.get(k), int)]
        if missing:
            raise ValueError(f"{name} comes without the {missing} it was computed with")


def empty_not_null(schema: dict[str, Any]) -> None:
    """In the JSON Schema, a comparison that was not evaluated is ``{}`` (as written)."""
    schema["anyOf"] = [
        {"type": "object", "maxProperties": 0} if option == {"type": "null"} else option
        for option in schema["anyOf"]
    ]


class Dataset(Open):
    name: str
    class_counts: list[NonNegativeInt]
    splits: list[Split]

    @model_validator(mode="after")
    def _one_split_per_class(self) -> Dataset:
        if len(self.splits) != len(self.class_counts):
            raise ValueError("splits must list one split per class")
        return self


class Checkpoint(Open):
    path: str
    step: int


class Identity(Open):
    digest: str


class RecordBase(Open):
    """What every record of the family has (the generation and the classification records)."""

    schema_version: Literal[3] = Field(alias="schema")
    code_version: str
    created: str | None = None
    identity: Identity
    config: dict[str, Any]
    dataset: Dataset

    # Sections whose class_counts list every class of the dataset (the classification record's).
    counted_sections: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _classes_exist(self) -> RecordBase:
        n = len(self.dataset.class_counts)
        bad = [k for k in self.metrics.per_class if class_index(k) >= n]  # type: ignore[attr-defined]
        if bad:
            raise ValueError(f"metrics.per_class names classes the dataset lacks: {bad}")
        for name in self.counted_sections:
            counts = getattr(self, name).class_counts
            if len(counts) != n:
                raise ValueError(f"{name}.class_counts has {len(counts)} classes, the dataset {n}")
        return self


Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Kind:
    """A record kind: its model, its schema number and how a record of schema 2 is upgraded."""

    model: type[BaseModel]
    schema: int = SCHEMA_VERSION
    upgrade: Upgrade | None = None


# kind -> Kind; records without ``kind`` are evaluations.
KINDS: dict[str, Kind] = {}


def register_kind(
    kind: str, model: type[BaseModel], upgrade: Upgrade | None = None, schema: int = SCHEMA_VERSION
) -> None:
    """Make records of ``kind`` readable and writable: validated by ``model`` at ``schema``;
    ``upgrade`` fills in what a record of schema 2 lacks (default: the number only)."""
    KINDS[kind] = Kind(model, schema, upgrade)


def record_kind(record: Mapping[str, Any]) -> Kind:
    """The registered kind of a record (``kind``; none: an evaluation)."""
    kind = record.get("kind", "evaluation")
    if kind not in KINDS:
        raise RecordError(
            f"records of kind {kind!r} are not known here: import the package that defines them "
            f"(known: {sorted(KINDS)})"
        )
    return KINDS[kind]


def upgrade(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record of schema 2 in the current one (a copy; current ones unchanged): the number,
    ``upgraded_from``, then what its kind's upgrade fills in."""
    out = dict(record)
    kind = record_kind(out)
    if out.get("schema") != 2 or kind.schema != SCHEMA_VERSION:
        return out
    out["schema"], out["upgraded_from"] = SCHEMA_VERSION, 2
    return kind.upgrade(out) if kind.upgrade else out


def validate(record: Any, source: str = "record") -> dict[str, Any]:
    """Raise :class:`RecordError` listing every problem; returns the record when it is valid."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{source} is not a JSON object")
    kind = record_kind(record)
    if record.get("schema", kind.schema) != kind.schema:
        raise RecordError(
            f"{source} has schema {record['schema']!r}, not {kind.schema} (written by another "
            "version; read it with read_record, which upgrades schema 2): evaluate again"
        )
    try:
        kind.model.model_validate(dict(record))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if 'function-after' not in str(p)) or 'record'}"
            f": {e['msg']}"
            for e in err.errors()
        )
        raise RecordError(f"{source} is not a valid record: {problems}") from None
    return dict(record)


def build_record(
    *, identity: dict[str, Any], code_version: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A validated record: schema, code version (this checkout's unless given), creation time,
    the settings ``identity``, then ``fields`` (the model of their ``kind`` says which are
    required; keys beyond them, e.g. timings, are kept). ``metrics`` may omit ``per_split`` /
    ``per_class`` (stored as {})."""
    if "metrics" in fields:
        fields["metrics"] = {"overall": {}, "per_split": {}, "per_class": {}, **fields["metrics"]}
    header = {
        "schema": SCHEMA_VERSION,
        "code_version": code_version if code_version is not None else runtime.code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "identity": identity,
    }
    return validate({**header, **fields})


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Validate, serialise (strict JSON: no NaN), then write atomically; any failure leaves an
    existing file at ``path`` untouched."""
    validate(record, f"record for {path}")
    try:
        return atomic_write_json(path, record, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RecordError(f"record for {path} cannot be written as JSON: {err}") from err


def read_record(path: str | Path) -> dict[str, Any]:
    """Read and validate a record, upgrading an older schema (:func:`upgrade`);
    :class:`RecordError` says what is wrong."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(
            f"{path} is not a readable record ({err}): re-run the evaluation"
        ) from err
    if isinstance(record, Mapping):
        record = upgrade(record)
    return validate(record, str(path))
