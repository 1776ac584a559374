"""Concept dominance: the analysis's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lt_diffusion.analysis.clip_score import clip_folder
from lt_diffusion.analysis.prompts import (
    read_prompt_set,
)

NAME = "concept_dominance"
BACKBONE = "text_to_image"  # analyze loads the run with load_analysed_run(text_to_image=True)
NOISE_STREAM, GROUP_STREAM = 103, 104  # random streams of the analysis seed


@dataclass(frozen=True)
class ConceptDominanceSettings:
    """Settings of the concept-dominance analysis (configs/analysis/concept_dominance.yaml)."""

    prompt_set: str = "artbench10_style_pairs"
    images_per_prompt: int = 4
    steps: int = 50
    guidance: float | None = None
    saturation: float = 0.9
    ablation_prompts: int = 8
    ablation_steps: int = 5
    group_sizes: tuple[int, ...] = field(default=(4, 16))
    clip: str | None = None
    lora_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))
        for key in ("saturation", "lora_scale"):  # 0 and 0.0 are one setting (record digests)
            object.__setattr__(self, key, float(getattr(self, key)))
        for key in ("images_per_prompt", "steps", "ablation_steps"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"analysis.{key} must be >= 1, got {getattr(self, key)}")
        if int(self.ablation_prompts) < 0:
            raise ValueError(
                f"analysis.ablation_prompts must be >= 0 (0: no head ablations), got "
                f"{self.ablation_prompts}"
            )
        if any(g < 1 for g in self.group_sizes):
            raise ValueError(f"analysis.group_sizes must be >= 1 each, got {self.group_sizes}")
        if not 0.0 < float(self.saturation) <= 1.0:
            raise ValueError(f"analysis.saturation must be in (0, 1], got {self.saturation}")
        if not (math.isfinite(float(self.lora_scale)) and float(self.lora_scale) >= 0.0):
            raise ValueError(
                f"analysis.lora_scale must be >= 0 (0: the pretrained model, 1: the fine-tuned "
                f"one), got {self.lora_scale}"
            )
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise ValueError(f"analysis.guidance must be a number or null, got {self.guidance}")
        read_prompt_set(self.prompt_set)  # a missing or malformed file stops here
        clip_folder(self.clip)  # a named but unusable CLIP folder too
