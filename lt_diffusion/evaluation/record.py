"""One JSON record per evaluation (DESIGN.md, Records). Tables are built only from these.

The record is a typed model (:class:`Record`), validated on write and on read; its JSON Schema
is docs/record.schema.json (regenerate with ``python -m lt_diffusion.evaluation.record``).
Metric entries are checked against the metric registry (:data:`metrics.METRICS`): a value is a
finite number, or None with ``<metric>_unavailable`` saying why, and comes with the settings it
depends on (``kid_subset_size`` with KID, ``pr_k`` with precision / recall).

Schema 3 (issue 27) adds what a reader needs to put a number beside a paper's: ``extractors``
(each feature space's torch-fidelity extractor, layer, dimension and weights' SHA-256; it
replaces schema 2's single ``extractor``), ``reference`` (which real images, or which
statistics file, the metrics compared with), ``conventions`` (the guidance formula and the
label schedule) and, in small comparisons, ``small_sample`` / ``primary``. Records of schema 2
are read through :func:`upgrade` (they keep their numbers; what they did not state is filled
in from what the code of that version did, and ``upgraded_from`` says so).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from lt_diffusion import runtime
from lt_diffusion.evaluation.metrics import METRICS
from lt_diffusion.utils.io import atomic_write_json

# 2: identity (settings digests); the sampler that ran, from the protocol.
# 3: extractors (per feature space), reference, conventions; small-sample entries.
SCHEMA_VERSION = 3
SPLIT_NAMES = ("many", "medium", "few")
_CLASS_KEY = re.compile(r"^(?:class_)?(\d+)$")
Split = Literal["many", "medium", "few"]


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


class _Open(BaseModel):
    """A part of the record that may hold more than its required keys (kept as they are)."""

    model_config = ConfigDict(extra="allow")


class MetricEntry(_Open):
    """One comparison's metrics (the extra keys, checked by :func:`check_metric_values`) and
    its notes; each record kind adds the counts it compared."""

    notes: list[str] = []

    @model_validator(mode="after")
    def _metrics(self) -> MetricEntry:
        check_metric_values(self.model_extra or {})
        return self


class Entry(MetricEntry):
    """One comparison: its image counts and every metric computed on it. ``n_real`` is None
    when a statistics file that does not state its count stood in for the real images;
    ``small_sample``: fewer images per side than FID's feature dimension, ``primary`` then
    names the number to read (KID)."""

    n_generated: NonNegativeInt
    n_real: NonNegativeInt | None
    small_sample: bool = False
    primary: str | None = None

    @model_validator(mode="after")
    def _primary(self) -> Entry:
        extra = self.model_extra or {}
        if self.primary is not None and self.primary not in extra:
            raise ValueError(f"primary names {self.primary!r}, which the entry does not hold")
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


def _empty_not_null(schema: dict[str, Any]) -> None:
    """In the JSON Schema, a comparison that was not evaluated is ``{}`` (as written)."""
    schema["anyOf"] = [
        {"type": "object", "maxProperties": 0} if option == {"type": "null"} else option
        for option in schema["anyOf"]
    ]


class Metrics(BaseModel):
    overall: Annotated[Entry | None, Field(json_schema_extra=_empty_not_null)]
    per_split: dict[Split, Entry]
    per_class: dict[Annotated[str, Field(pattern=_CLASS_KEY.pattern)], Entry]

    @field_validator("overall", mode="before")
    @classmethod
    def _not_evaluated(cls, value: Any) -> Any:
        return None if value == {} else value


class Dataset(_Open):
    name: str
    class_counts: list[NonNegativeInt]
    splits: list[Split]

    @model_validator(mode="after")
    def _one_split_per_class(self) -> Dataset:
        if len(self.splits) != len(self.class_counts):
            raise ValueError("splits must list one split per class")
        return self


class Checkpoint(_Open):
    path: str
    step: int


class Sampler(_Open):
    guidance: float | None  # None: an image folder that does not say


class Extractor(_Open):
    """A feature space's extractor: torch-fidelity's name, the layer, its weights' SHA-256."""

    name: str
    weights_sha256: str


class Reference(_Open):
    """What the metrics compared with: the dataset's real images (``origin: dataset``: which
    split) or a statistics file (``origin: file``: its path, SHA-256, extractor, counts)."""

    origin: Literal["dataset", "file"]
    description: str


class Conventions(_Open):
    """The guidance formula (and the same weight in diffusers' convention) and how generated
    labels are drawn, so that numbers can be put beside papers that use another."""

    guidance: dict[str, Any]
    labels: str


class Identity(_Open):
    digest: str


class RecordBase(_Open):
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


class Record(RecordBase):
    """The record of one evaluation (docs/evaluation.md)."""

    checkpoint: Checkpoint
    sampler: Sampler
    protocol: dict[str, Any]
    extractors: dict[str, Extractor | dict[str, Any]]  # space -> extractor; "lpips": its nets
    reference: Reference
    conventions: Conventions
    metrics: Metrics

    @model_validator(mode="after")
    def _spaces(self) -> Record:
        bad = [
            k for k, v in self.extractors.items() if k != "lpips" and not isinstance(v, Extractor)
        ]
        if bad:
            raise ValueError(f"extractors {bad} lack their name or weights_sha256")
        return self


def _record_model(record: Mapping[str, Any]) -> type[BaseModel]:
    """The model of a record's ``kind``: a generation evaluation (no kind), or a classifier's
    test evaluation (:mod:`lt_diffusion.classification.record`)."""
    if record.get("kind") == "classification":
        from lt_diffusion.classification.record import ClassificationRecord

        return ClassificationRecord
    return Record


# What schema 2's code did, stated by schema 3 records (upgrade() fills them in).
GUIDANCE_FORMULA = "eps_c + w (eps_c - eps_u)"
LABELS = (
    "exactly class-uniform: each comparison's generated images are split over its classes as "
    "evenly as the count divides (per-class counts differ by at most one), labels in class "
    "order, not drawn at random"
)


def conventions(guidance: float | None) -> dict[str, Any]:
    """The record's ``conventions``: the guidance formula with weight ``w`` and the same weight
    in diffusers' ``uncond + s (cond - uncond)`` (s = w + 1; w = 0 is purely conditional), and
    the label schedule (:data:`LABELS`)."""
    return {
        "guidance": {
            "formula": GUIDANCE_FORMULA,
            "w": guidance,
            "diffusers_guidance_scale": None if guidance is None else float(guidance) + 1.0,
            "diffusers_formula": "eps_u + s (eps_c - eps_u), s = w + 1",
        },
        "labels": LABELS,
    }


def upgrade(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record of an older schema in the current one (a copy; current ones unchanged).

    2 -> 3: ``extractor`` becomes ``extractors`` (``{"inception": ...}``, its LPIPS part under
    ``"lpips"``; none for the synthetic benchmark's exact metrics); ``reference`` says the
    dataset's own reference split (all schema 2 could use); ``conventions`` are the formula and
    label schedule schema 2's code used (unchanged since); ``upgraded_from: 2``."""
    out = dict(record)
    if out.get("schema") != 2:
        return out
    out["schema"] = 3
    out["upgraded_from"] = 2
    if out.get("kind") == "classification":
        return out
    old = dict(out.pop("extractor", None) or {})
    extractors: dict[str, Any] = {}
    if "lpips" in old:
        extractors["lpips"] = old.pop("lpips")
    if old.get("weights_sha256") not in (None, "none"):
        extractors["inception"] = {
            "space": "inception", "layer": "2048", "dim": 2048,
            "name": old.get("name", "inception-v3-compat"), **old,
        }  # fmt: skip
    out["extractors"] = extractors
    out.setdefault(
        "reference",
        {
            "origin": "dataset",
            "description": "the dataset's own reference split (written under schema 2, which "
            "did not state it; it had no other reference)",
        },
    )
    guidance = (out.get("sampler") or {}).get("guidance")
    out.setdefault("conventions", conventions(guidance))
    return out


def validate(record: Any, source: str = "record") -> dict[str, Any]:
    """Raise :class:`RecordError` listing every problem; returns the record when it is valid."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{source} is not a JSON object")
    if record.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise RecordError(
            f"{source} has schema {record['schema']!r}, not {SCHEMA_VERSION} (written by "
            "another version; read it with read_record, which upgrades schema 2): evaluate "
            "again"
        )
    try:
        _record_model(record).model_validate(dict(record))
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
    the settings ``identity``, then ``fields`` (the model of their ``kind``
    says which are required: :class:`Record` for an evaluation, the classification record
    for ``kind="classification"``; keys beyond them, e.g. timings, are kept). ``metrics``
    may omit ``per_split`` / ``per_class`` (stored as {})."""
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


def json_schema() -> dict[str, Any]:
    """The record's JSON Schema (docs/record.schema.json)."""
    return Record.model_json_schema(by_alias=True)


if __name__ == "__main__":  # python -m lt_diffusion.evaluation.record > docs/record.schema.json
    print(json.dumps(json_schema(), indent=2))
