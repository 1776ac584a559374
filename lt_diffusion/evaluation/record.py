"""The record of one evaluation (DESIGN.md, Records; docs/evaluation.md): the record family's
base (:mod:`lt_diffusion.records.base`) with the checkpoint and sampler that generated, the
protocol, the feature spaces, the reference and the conventions. Its JSON Schema is
docs/record.schema.json (regenerate with ``python -m lt_diffusion.evaluation.record``).

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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, NonNegativeInt, field_validator, model_validator

from lt_diffusion.evaluation import metrics as _metrics  # noqa: F401  (registers them)
from lt_diffusion.records.base import (  # the family's names, importable here as before
    CLASS_KEY,
    SCHEMA_VERSION,
    SPLIT_NAMES,
    Checkpoint,
    MetricEntry,
    Open,
    RecordBase,
    RecordError,
    Split,
    build_record,
    class_index,
    empty_not_null,
    read_record,
    register_kind,
    validate,
    write_record,
)

__all__ = [
    "SCHEMA_VERSION", "SPLIT_NAMES", "Entry", "Record", "RecordError", "build_record",
    "class_index", "conventions", "json_schema", "read_record", "record_filename", "validate",
    "write_record",
]  # fmt: skip


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


class Metrics(BaseModel):
    overall: Annotated[Entry | None, Field(json_schema_extra=empty_not_null)]
    per_split: dict[Split, Entry]
    per_class: dict[Annotated[str, Field(pattern=CLASS_KEY.pattern)], Entry]

    @field_validator("overall", mode="before")
    @classmethod
    def _not_evaluated(cls, value: Any) -> Any:
        return None if value == {} else value


class SamplerEntry(Open):
    guidance: float | None  # None: an image folder that does not say


class Extractor(Open):
    """A feature space's extractor: torch-fidelity's name, the layer, its weights' SHA-256."""

    name: str
    weights_sha256: str


class Reference(Open):
    """What the metrics compared with: the dataset's real images (``origin: dataset``: which
    split) or a statistics file (``origin: file``: its path, SHA-256, extractor, counts)."""

    origin: Literal["dataset", "file"]
    description: str


class Conventions(Open):
    """The guidance formula (and the same weight in diffusers' convention) and how generated
    labels are drawn, so that numbers can be put beside papers that use another."""

    guidance: dict[str, Any]
    labels: str


class Record(RecordBase):
    """The record of one evaluation (docs/evaluation.md)."""

    checkpoint: Checkpoint
    sampler: SamplerEntry
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


def upgrade(out: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation record of schema 2 lacks, filled in (:func:`records.base.upgrade`
    has renumbered it). ``extractor`` becomes ``extractors`` (``{"inception": ...}``, its LPIPS part under
    ``"lpips"``; none for the synthetic benchmark's exact metrics); ``reference`` says the
    dataset's own reference split (all schema 2 could use); ``conventions`` are the formula and
    label schedule schema 2's code used (unchanged since)."""
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


register_kind("evaluation", Record, upgrade)


def json_schema() -> dict[str, Any]:
    """The record's JSON Schema (docs/record.schema.json)."""
    return Record.model_json_schema(by_alias=True)


if __name__ == "__main__":  # python -m lt_diffusion.evaluation.record > docs/record.schema.json
    print(json.dumps(json_schema(), indent=2))
