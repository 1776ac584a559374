"""Concept dominance: the record's results, validated before they are written."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lt_diffusion.analysis.concept_dominance.settings import NAME


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A share of comparisons in [0, 1], None where there were none.
Rate = Annotated[float, Field(ge=0.0, le=1.0)] | None


def _check_shares(rows: list[list[float]], k: int, what: str) -> None:
    for row in rows:
        if len(row) != k or any(not 0.0 <= v <= 1.0 for v in row) or abs(sum(row) - 1) > 1e-6:
            raise ValueError(f"{what}: {row} are not {k} shares summing to one")


class PromptEntry(_Strict):
    text: str
    concepts: list[str]
    token_positions: list[list[int]]
    dominant: int
    share_by_step: list[list[float]]
    share_by_layer: list[list[float]]
    image_share: list[list[float]]
    share_gap: float
    saturation_step: int
    saturation_t: int
    saturation_fraction: float
    suppression: float
    clip_similarity: list[list[float]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PromptEntry:
        k = len(self.concepts)
        if k < 2 or len(self.token_positions) != k or not all(self.token_positions):
            raise ValueError(f"{self.text!r}: every one of >= 2 concepts needs token positions")
        if not 0 <= self.dominant < k:
            raise ValueError(f"{self.text!r}: dominant {self.dominant} is not a concept index")
        for what in ("share_by_step", "share_by_layer", "image_share"):
            _check_shares(getattr(self, what), k, f"{self.text!r}.{what}")
        if not 0.0 <= self.saturation_fraction <= 1.0:
            raise ValueError(f"{self.text!r}: saturation_fraction outside [0, 1]")
        if self.clip_similarity is not None and len(self.clip_similarity) != len(self.image_share):
            raise ValueError(f"{self.text!r}: clip_similarity needs one row per image")
        return self


class PairEntry(_Strict):
    concepts: list[str]
    comparisons: int
    first_dominates: dict[str, Rate]


class ConceptEntry(_Strict):
    concept: str
    class_index: int | None
    count: int | None
    win_rate: dict[str, Rate]


class SingleHead(_Strict):
    layer: str
    head: int
    delta_dominant_share: float
    delta_dominant_mass: float
    delta_dominated_mass: float
    relative_eps_change: float


class Group(_Strict):
    kind: str
    size: int
    heads: list[tuple[str, int]]
    delta_share_gap: float
    attention_flip_rate: float
    relative_latent_change: float
    clip_flip_rate: float | None

    @model_validator(mode="after")
    def _sized(self) -> Group:
        if self.kind not in ("top", "random") or len(self.heads) != self.size:
            raise ValueError(f"group {self.kind} of size {self.size} lists {len(self.heads)} heads")
        return self


class Ablation(_Strict):
    prompts: list[int]
    steps: list[int]
    single_heads: list[SingleHead]
    max_single_head_delta_share: float
    groups: list[Group]


class Results(_Strict):
    concepts_per_prompt: int
    images_per_prompt: int
    timesteps: list[int]
    layers: list[str]
    heads: list[int]
    prompts: list[PromptEntry]
    dominant_share_by_step: list[float]
    dominated_share_by_step: list[float]
    head_bias: list[list[float]]
    mean_share_gap: float | None
    mean_saturation_fraction: float | None
    mean_suppression: float | None
    pairs: list[PairEntry]
    per_concept: list[ConceptEntry]
    frequent_dominates: dict[str, Rate]
    frequent_comparisons: int
    spearman_win_rate_vs_count: dict[str, float | None]
    token_mass_sum_max_error: float
    ablation: Ablation | None
    guidance: float
    sampler: dict[str, Any]
    clip: dict[str, str | None]
    seconds: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Results:
        steps, k = len(self.timesteps), self.concepts_per_prompt
        if len(self.layers) != len(self.heads) or [len(b) for b in self.head_bias] != self.heads:
            raise ValueError("head_bias must hold one value per head of each layer")
        for p in self.prompts:
            if len(p.share_by_step) != steps or len(p.concepts) != k:
                raise ValueError(f"{p.text!r}: share_by_step needs {steps} rows of {k} shares")
            if len(p.share_by_layer) != len(self.layers):
                raise ValueError(f"{p.text!r}: share_by_layer needs one row per layer")
            if len(p.image_share) != self.images_per_prompt:
                raise ValueError(f"{p.text!r}: image_share needs one row per image")
        if self.token_mass_sum_max_error > 1e-4:
            raise ValueError(
                f"attention masses sum to 1 over the tokens only up to "
                f"{self.token_mass_sum_max_error}: the probe does not see the softmax it should"
            )
        known = {(layer, h) for layer, n in zip(self.layers, self.heads) for h in range(n)}
        if self.ablation is not None:
            for s in self.ablation.single_heads:
                if (s.layer, s.head) not in known:
                    raise ValueError(f"ablated head {(s.layer, s.head)} is not a head")
            for g in self.ablation.groups:
                if not set(map(tuple, g.heads)) <= known:
                    raise ValueError(f"group {g.kind} {g.size} names heads the model lacks")
        return self


def validate(record: dict[str, Any]) -> dict[str, Any]:
    """The record, after checking its results against :class:`Results` (shares sum to one,
    rates in [0, 1], one value per step / layer / head / image); ValueError otherwise."""
    if record.get("analysis") != NAME:
        raise ValueError(f"not a {NAME} record (analysis: {record.get('analysis')!r})")
    try:
        Results.model_validate(record["results"])
    except ValidationError as err:
        raise ValueError(f"invalid {NAME} record: {err}") from err
    return record
