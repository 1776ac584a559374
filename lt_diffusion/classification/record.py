"""The record of a classifier's test evaluation: the record family
(:mod:`lt_diffusion.records.base`) with ``kind: classification``.

Shared with the generation record: ``identity`` (settings digests), ``config`` (the composed
run config), ``dataset`` (the long-tailed training counts and the split map), ``checkpoint``
(path, step) and ``metrics.{overall, per_split, per_class}`` entries, so the table layer reads
both alike (``per_split.few.accuracy``). Its own: ``training`` (the counts trained on, with
any generated images and the generator run that made them), ``test`` (the test split and its
counts) and ``prediction`` (the post-hoc logit adjustment). An entry counts its test images
(``n_test``) instead of generated / real images. ``read_record`` and ``write_record`` validate
it by its ``kind``; its JSON Schema is docs/classification_record.schema.json (regenerate with
``python -m lt_diffusion.classification.record``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, NonNegativeInt

from lt_diffusion.classification import metrics as _metrics  # noqa: F401  (registers them)
from lt_diffusion.records.base import (
    CLASS_KEY,
    Checkpoint,
    MetricEntry,
    Open,
    RecordBase,
    Split,
    register_kind,
)

KIND = "classification"


class ClassifierEntry(MetricEntry):
    """One comparison of the test set: its images and the metrics on them."""

    n_test: NonNegativeInt


class ClassifierMetrics(BaseModel):
    overall: ClassifierEntry
    per_split: dict[Split, ClassifierEntry]
    per_class: dict[Annotated[str, Field(pattern=CLASS_KEY.pattern)], ClassifierEntry]


class Training(Open):
    """What the classifier was trained on."""

    class_counts: list[NonNegativeInt]  # real + generated images per class
    n_real: NonNegativeInt
    n_generated: NonNegativeInt
    augmentation: dict[str, Any] | None  # the generated images and the run that made them


class EvaluationSet(Open):
    split: str
    class_counts: list[NonNegativeInt]


class ClassifierCheckpoint(Checkpoint):
    max_steps: int  # the run's budget: a record of an unfinished run does not count


class ClassificationRecord(RecordBase):
    """The record of one classification run (docs/classification.md)."""

    kind: Literal["classification"]
    checkpoint: ClassifierCheckpoint
    training: Training
    test: EvaluationSet
    prediction: dict[str, Any]
    metrics: ClassifierMetrics
    counted_sections = ("training", "test")


register_kind(KIND, ClassificationRecord)


def json_schema() -> dict[str, Any]:
    """The classification record's JSON Schema (docs/classification_record.schema.json)."""
    return ClassificationRecord.model_json_schema(by_alias=True)


if __name__ == "__main__":  # python -m ... > docs/classification_record.schema.json
    print(json.dumps(json_schema(), indent=2))
