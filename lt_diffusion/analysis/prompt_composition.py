"""Composition success of a text-to-image model on two-concept prompts (the IMBA paper's
success rate and CLIP score; Stable Diffusion backbones, ``model=sd_lora``).

For every prompt of a prompt set (:mod:`lt_diffusion.analysis.prompts`; default
``photo_pairs``: ``"a photo of a <a> and a photo of a <b>"`` for every ordered pair of the run's
classes, the captions the ``imba/sd_*`` rows train on) the model generates
``images_per_prompt`` images (DDIM, ``steps`` steps, guidance ``w``; image ``i`` starts from the
same noise for every prompt). Each image is judged by up to two staged models:

* **VQA** (:mod:`lt_diffusion.analysis.vqa_score`, the paper's judge): concept ``k`` is present
  when a BLIP VQA model answers "yes" to ``question`` about it;
* **CLIP** (:mod:`lt_diffusion.analysis.clip_score`): concept ``k`` is present when the image's
  CLIP similarity with the concept's class prompt (``"a photo of a <k>"``) exceeds its
  similarity with ``presence_reference`` (``"a photo"``) by more than ``presence_margin``
  (ours: the paper judges presence by VQA only). Every similarity is recorded, so another rule
  can be applied to the record.

An image **composes** its prompt when every concept is present; the **success rate** is the share
of images that do, over all prompts. The **CLIP score** is the mean CLIP similarity of an image
with its whole prompt (the paper's "CLIP Score", a cosine). The **colour shift** is the distance
between the mean RGB colour of the generated images and of the run's training images (0..255
units): a colour cast shows as a rise of it against the standard loss (the paper's gamma -> 2).

A scorer that is not staged leaves its numbers null with the staging instruction in the record
(``clip.unavailable``, ``vqa.unavailable``), so a table's cells say why; ``require: [vqa]`` (or
``clip``) instead refuses to start without it. ``lora_scale`` as in the concept-dominance
analysis (0: the pretrained model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.analysis.clip_score import NOT_STAGED as CLIP_NOT_STAGED
from lt_diffusion.analysis.clip_score import ClipScorer, clip_folder
from lt_diffusion.analysis.common import AnalysedRun, finite_or_none, model_dtype, progress
from lt_diffusion.analysis.prompts import build_prompts, read_prompt_set
from lt_diffusion.analysis.vqa_score import NOT_STAGED as VQA_NOT_STAGED
from lt_diffusion.analysis.vqa_score import QUESTION, VqaScorer, vqa_folder
from lt_diffusion.data.datamodule import stream_seed

NAME = "prompt_composition"
BACKBONE = "text_to_image"  # analyze loads the run with load_analysed_run(text_to_image=True)
SCORERS = ("clip", "vqa")
_NOISE = 105  # random stream of the analysis seed


@dataclass(frozen=True)
class PromptCompositionSettings:
    """Settings of the prompt-composition analysis (configs/analysis/prompt_composition.yaml)."""

    prompt_set: str = "photo_pairs"
    images_per_prompt: int = 25
    steps: int = 50
    guidance: float | None = None
    clip: str | None = None
    vqa: str | None = None
    require: tuple[str, ...] = field(default=())
    presence_reference: str = "a photo"
    presence_margin: float = 0.0
    question: str = QUESTION
    lora_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "require", tuple(str(r) for r in self.require))
        for key in ("presence_margin", "lora_scale"):  # 0 and 0.0 are one setting (digests)
            object.__setattr__(self, key, float(getattr(self, key)))
        for key in ("images_per_prompt", "steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"analysis.{key} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lora_scale) and self.lora_scale >= 0.0):
            raise ValueError(f"analysis.lora_scale must be >= 0, got {self.lora_scale}")
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise ValueError(f"analysis.guidance must be a number or null, got {self.guidance}")
        if "{}" not in self.question:
            raise ValueError(f"analysis.question needs a '{{}}' for the concept: {self.question!r}")
        unknown = sorted(set(self.require) - set(SCORERS))
        if unknown:
            raise ValueError(f"analysis.require lists {unknown}; it takes a subset of {SCORERS}")
        read_prompt_set(self.prompt_set)  # a missing or malformed file stops here
        # A named but unusable folder, or a required scorer that is not staged, stops here:
        # before the checkpoint is read or anything is generated.
        staged = {"clip": clip_folder(self.clip), "vqa": vqa_folder(self.vqa)}
        why = {"clip": CLIP_NOT_STAGED, "vqa": VQA_NOT_STAGED}
        for scorer in self.require:
            if staged[scorer] is None:
                raise FileNotFoundError(
                    f"analysis.require lists {scorer}, but {why[scorer]}; or leave {scorer} out "
                    "of analysis.require to write the record without its numbers"
                )


class _Prompted(nn.Module):
    """``model(x, t, y)`` for the samplers, ``y`` indexing rows of prompt embeddings (the last
    is the empty prompt, the null label)."""

    def __init__(self, unet: nn.Module, embeds: Tensor) -> None:
        super().__init__()
        self.unet, self.embeds = unet, embeds
        self.null_label = len(embeds) - 1

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=self.embeds[y]).sample


def generate_images(
    run: AnalysedRun, texts: list[str], settings: PromptCompositionSettings, guidance: float,
    batch_size: int, show_progress: bool,
) -> Tensor:  # fmt: skip
    """uint8 images ``(P * n, 3, H, W)``, prompt-major, image ``i`` of every prompt from the
    same initial noise."""
    from lt_diffusion.analysis.concept_dominance import lora_scaled
    from lt_diffusion.diffusion import DDIMSampler, to_uint8

    model, device, dtype = run.model, run.device, model_dtype(run.model)
    n = int(settings.images_per_prompt)
    embeds = model.encode_prompts([*texts, ""]).to(device, dtype)
    net = _Prompted(model.unet, embeds)
    sampler = DDIMSampler(run.schedule, steps=int(settings.steps), eta=0.0, clip_denoised=False)
    samples = [(p, i) for p in range(len(texts)) for i in range(n)]
    per_batch = max(1, int(batch_size) // 2)  # guidance doubles each forward
    chunks = [samples[k : k + per_batch] for k in range(0, len(samples), per_batch)]
    images = []
    with lora_scaled(model, settings.lora_scale), torch.inference_mode():
        for chunk in progress(chunks, "prompt composition", show_progress):
            noise = []
            for _, i in chunk:
                g = torch.Generator().manual_seed(stream_seed(int(settings.seed), _NOISE, i))
                noise.append(torch.randn(model.latent_shape, generator=g))
            x = torch.stack(noise).to(device, dtype)
            y = torch.tensor([p for p, _ in chunk], device=device)
            latents = sampler.sample(net, x, y, guidance, clamp=False)
            images.append(to_uint8(model.decode_latents(latents)).cpu())
    return torch.cat(images)


def mean_colour(images: Tensor, batch: int = 512) -> Tensor:
    """The mean RGB colour (0..255) of uint8 images ``(N, 3, H, W)``, float64 ``(3,)``."""
    total = torch.zeros(3, dtype=torch.float64)
    for k in range(0, len(images), batch):
        total += images[k : k + batch].double().mean(dim=(2, 3)).sum(0)
    return total / max(len(images), 1)


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def compute(
    run: AnalysedRun,
    settings: PromptCompositionSettings,
    batch_size: int,
    show_progress: bool,
) -> dict[str, Any]:
    """Generate every prompt's images, judge concept presence with the staged scorers, and
    summarise success, CLIP score and colour shift."""
    from lt_diffusion.runs.build import check_guidance

    model = run.model
    names = [str(n) for n in run.info["class_names"]]
    prompts = build_prompts(read_prompt_set(settings.prompt_set), names)
    texts = [p.text for p in prompts]
    guidance = float(
        run.train_cfg.sampler.guidance if settings.guidance is None else settings.guidance
    )
    check_guidance(run.train_cfg, guidance, str(run.meta["checkpoint"]), "analysis.guidance")
    clip_dir, vqa_dir = clip_folder(settings.clip), vqa_folder(settings.vqa)
    images = generate_images(run, texts, settings, guidance, batch_size, show_progress)
    n = int(settings.images_per_prompt)

    clip = ClipScorer(clip_dir, run.device) if clip_dir is not None else None
    vqa = VqaScorer(vqa_dir, run.device) if vqa_dir is not None else None
    per_prompt: list[dict[str, Any]] = []
    success: dict[str, list[bool]] = {"clip": [], "vqa": []}
    scores, min_sims = [], []
    for p, prompt in enumerate(prompts):
        mine = images[p * n : (p + 1) * n]
        entry: dict[str, Any] = {"text": prompt.text, "concepts": list(prompt.concepts)}
        if clip is not None:
            concept_texts = [model.prompt_template.format(c.replace("_", " "))
                             for c in prompt.concepts]  # fmt: skip
            sim = clip.similarity(mine, [*concept_texts, settings.presence_reference, prompt.text])
            k = len(prompt.concepts)
            present = (sim[:, :k] - sim[:, k : k + 1]) > settings.presence_margin
            entry["clip_similarity"] = sim[:, :k].tolist()
            entry["reference_similarity"] = sim[:, k].tolist()
            entry["prompt_similarity"] = sim[:, k + 1].tolist()
            entry["clip_present"] = present.tolist()
            success["clip"] += present.all(1).tolist()
            scores += sim[:, k + 1].tolist()
            min_sims += sim[:, :k].min(1).values.tolist()
        if vqa is not None:
            present, answers = vqa.present(mine, prompt.concepts, settings.question)
            entry["vqa_answers"] = answers
            entry["vqa_present"] = present.tolist()
            success["vqa"] += present.all(1).tolist()
        per_prompt.append(entry)
    reference = mean_colour(run.training_data().train_images.cpu())
    generated = mean_colour(images)
    return {
        "images_per_prompt": n,
        "guidance": guidance,
        "sampler": {"name": f"ddim{settings.steps}", "eta": 0.0, "steps": int(settings.steps)},
        "prompts": per_prompt,
        "clip": {
            "folder": None if clip_dir is None else str(clip_dir),
            "unavailable": None if clip is not None else CLIP_NOT_STAGED,
            "success": _rate(success["clip"]),
            "score": finite_or_none(sum(scores) / len(scores)) if scores else None,
            "min_concept_similarity": (
                finite_or_none(sum(min_sims) / len(min_sims)) if min_sims else None
            ),
        },
        "vqa": {
            "folder": None if vqa_dir is None else str(vqa_dir),
            "unavailable": None if vqa is not None else VQA_NOT_STAGED,
            "success": _rate(success["vqa"]),
        },
        "mean_colour": generated.tolist(),
        "training_mean_colour": reference.tolist(),
        "colour_shift": float((generated - reference).norm()),
    }


def validate(record: dict[str, Any]) -> dict[str, Any]:
    """The record, after checking its rates and that an unstaged scorer has no numbers."""
    if record.get("analysis") != NAME:
        raise ValueError(f"not a {NAME} record (analysis: {record.get('analysis')!r})")
    res = record["results"]
    for scorer in SCORERS:
        part = res[scorer]
        rate = part.get("success")
        if rate is not None and not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"{scorer}.success={rate} is not a rate")
        if part.get("unavailable") and rate is not None:
            raise ValueError(f"{scorer} is unavailable but has a success rate")
    if not res["colour_shift"] >= 0.0:
        raise ValueError(f"colour_shift must be >= 0, got {res['colour_shift']}")
    return record


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Per prompt, the share of images in which each concept is present (CLIP and VQA where
    staged) and the share composing the prompt."""
    import numpy as np

    from lt_diffusion.analysis.plots import new_figure, save_figure, title_of

    res = record["results"]
    fig, (ax,) = new_figure()
    labels, bars = [], {}
    for entry in res["prompts"]:
        labels.append(entry["text"])
        for scorer in SCORERS:
            present = entry.get(f"{scorer}_present")
            if present is None:
                continue
            arr = np.asarray(present, dtype=float)
            for k in range(len(entry["concepts"])):
                bars.setdefault(f"{scorer}: concept {k + 1}", []).append(arr[:, k].mean())
            bars.setdefault(f"{scorer}: both", []).append(arr.all(1).mean())
    width = 0.8 / max(len(bars), 1)
    for j, (label, values) in enumerate(bars.items()):
        ax.bar(np.arange(len(values)) + j * width, values, width, label=label)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    ax.set_xticklabels(labels, fontsize=6, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of images")
    if not bars:
        ax.text(0.5, 0.5, "no scorer staged (CLIP, VQA)", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    clip, vqa = res["clip"]["success"], res["vqa"]["success"]
    what = ", ".join(
        f"{k} success {v:.2f}" for k, v in (("VQA", vqa), ("CLIP", clip)) if v is not None
    )
    ax.set_title(title_of(record, what or "no scorer staged"), fontsize=9)
    return save_figure(fig, path)
