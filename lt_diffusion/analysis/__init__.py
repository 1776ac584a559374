"""The papers' diagnostic analyses of a trained run: each reads a checkpoint, writes one JSON
record and one PNG under ``<run_dir>/analyses/`` (``python -m lt_diffusion.analyze``).

* :mod:`~lt_diffusion.analysis.pruning`: per-class loss change after magnitude pruning
  (CM paper, Fig. 1(b)).
* :mod:`~lt_diffusion.analysis.imba_distance`: IMBA distance per class at t = T (IMBA loss).
* :mod:`~lt_diffusion.analysis.feature_overlap`: k-NN label purity of bottleneck features
  (CORAL).
* :mod:`~lt_diffusion.analysis.gradient_dominance`: share of parameter tensors whose gradient
  the majority classes dominate (CM paper, Theorem 2.1).
* :mod:`~lt_diffusion.analysis.concept_dominance`: cross-attention dominance of one concept over
  the others in multi-concept prompts, head ablations, concept presence by CLIP, and dominance
  against the concepts' frequency (DominanceBench; Stable Diffusion backbones).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lt_diffusion.analysis import (
    composition,
    concept_dominance,
    feature_overlap,
    gradient_dominance,
    imba_distance,
    prompt_composition,
    pruning,
)
from lt_diffusion.analysis.common import RECORD_KIND, RECORD_SCHEMA
from lt_diffusion.records.base import register_kind

# analysis.name -> (module with compute() and plot(), its settings dataclass)
ANALYSES: dict[str, tuple[ModuleType, type]] = {
    pruning.NAME: (pruning, pruning.PruningSettings),
    imba_distance.NAME: (imba_distance, imba_distance.ImbaDistanceSettings),
    feature_overlap.NAME: (feature_overlap, feature_overlap.FeatureOverlapSettings),
    gradient_dominance.NAME: (gradient_dominance, gradient_dominance.GradientDominanceSettings),
    concept_dominance.NAME: (concept_dominance, concept_dominance.ConceptDominanceSettings),
    composition.NAME: (composition, composition.CompositionSettings),
    prompt_composition.NAME: (prompt_composition, prompt_composition.PromptCompositionSettings),
}


class AnalysisRecord(BaseModel):
    """An analysis record (``kind: analysis``): its results checked by its analysis's
    ``validate`` when it has one (records and tables read it as any other kind)."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["analysis"]
    analysis: str
    settings: dict[str, Any]
    checkpoint: dict[str, Any]
    results: dict[str, Any] = Field(json_schema_extra={"additionalProperties": True})

    @model_validator(mode="after")
    def _known(self) -> AnalysisRecord:
        if self.analysis not in ANALYSES:
            raise ValueError(f"{self.analysis!r} is not a known analysis ({sorted(ANALYSES)})")
        module = ANALYSES[self.analysis][0]
        if hasattr(module, "validate"):
            module.validate(self.model_dump())
        return self


register_kind(RECORD_KIND, AnalysisRecord, schema=RECORD_SCHEMA)

__all__ = ["ANALYSES", "AnalysisRecord"]
