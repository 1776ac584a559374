"""Concept dominance in multi-concept prompts (DominanceBench, Jeong & Lee, "Dominating vs.
Dominated: Generative Collapse in Diffusion Models"; dominance_bench_dvd.txt), on a
text-to-image backbone of the framework (``model=sd_lora``).

The paper's three findings, each measured here on prompts that name several concepts (a prompt
set, :mod:`lt_diffusion.analysis.prompts`; ArtBench-10: two styles per prompt):

1. *Data*: limited instance diversity worsens the interference. Here: the concept's frequency in
   the fine-tuning data against how often it dominates (Spearman over the classes, and the rate
   at which the more frequent concept of a prompt wins).
2. *Attention*: dominant tokens saturate cross-attention and suppress the others over the
   timesteps. Here: every cross-attention head's mass on each concept's tokens at every
   sampling step (:mod:`lt_diffusion.analysis.attention`), the concepts' shares over time,
   how fast the dominant share saturates and how much the others lose.
3. *Heads*: the behaviour is distributed over many heads. Here: ablating each single head,
   and groups of the most dominance-biased heads against random groups of the same size.

Definitions (all recorded): at sampling step ``i`` (DDIM, ``steps`` steps, classifier-free
guidance ``w``), cross-attention layer ``l`` and head ``h``, the mass of concept ``k`` is the sum
over its token positions of the mean (over image positions) attention probability;
the concept **share** is its mass over the summed masses of the prompt's concepts (shares sum to
one over the concepts). A prompt's **trajectory share** is the mean share over steps and over
every head of every layer (each head counts once); its **dominant** concept has the largest.
On one image the concept with the larger trajectory share *wins* (ties count a half).
**Saturation**: the first step at which the dominant share has covered ``saturation`` (0.9) of
its rise from step 0 to its maximum; reported as a step, a timestep and a fraction of the
trajectory (0: saturated from the start). **Suppression**: the dominated concepts' mean share
at the first step minus at the last.

The **concept presence** scores are CLIP similarities of the generated image with each
concept's class prompt (:mod:`lt_diffusion.analysis.clip_score`), when a local CLIP model is
staged; DominanceBench judges presence with a VQA model instead, which the framework has not.

``lora_scale`` scales every LoRA adapter: 0 is the pretrained model the run fine-tuned from
(the "before" of a fine-tuning comparison), 1 the fine-tuned one.
"""

from lt_diffusion.analysis.concept_dominance.measures import saturation
from lt_diffusion.analysis.concept_dominance.pipeline import compute
from lt_diffusion.analysis.concept_dominance.plot import plot
from lt_diffusion.analysis.concept_dominance.record import validate
from lt_diffusion.analysis.concept_dominance.settings import (
    BACKBONE,
    NAME,
    ConceptDominanceSettings,
)
from lt_diffusion.analysis.concept_dominance.tracing import lora_scaled

__all__ = [
    "BACKBONE", "NAME", "ConceptDominanceSettings", "compute", "lora_scaled", "plot",
    "saturation", "validate",
]  # fmt: skip
