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

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from lt_diffusion.analysis.attention import CrossAttentionProbe
from lt_diffusion.analysis.clip_score import NOT_STAGED, ClipScorer, clip_folder
from lt_diffusion.analysis.common import (
    AnalysedRun,
    finite_or_none,
    model_dtype,
    progress,
    rank_correlation,
)
from lt_diffusion.analysis.prompts import (
    ConceptPrompt,
    build_prompts,
    concept_positions,
    read_prompt_set,
)
from lt_diffusion.data.datamodule import stream_seed

NAME = "concept_dominance"
BACKBONE = "text_to_image"  # analyze loads the run with load_analysed_run(text_to_image=True)
_NOISE, _GROUP = 103, 104  # random streams of the analysis seed


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


# ----------------------------------------------------------------------------------------------
# Sampling with the probe


@contextmanager
def lora_scaled(model: nn.Module, scale: float) -> Iterator[None]:
    """Every LoRA adapter of ``model`` at ``scale`` times its current scale inside the block
    (0: the pretrained weights the adapters were added to)."""
    layers = model.lora_layers() if hasattr(model, "lora_layers") else []
    if float(scale) != 1.0 and not layers:
        raise ValueError(
            f"analysis.lora_scale={scale} but the model has no LoRA adapters (fine-tuned "
            "without model.lora): leave it at 1"
        )
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for adapter in layer.scaling:
            layer.scaling[adapter] *= float(scale)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


class PromptConditioned(nn.Module):
    """``model(x, t, y)`` for the samplers, ``y`` indexing the rows of ``embeds`` (the last is
    the empty prompt, the null label). Each call's concept masses are taken from the probe."""

    def __init__(
        self, backbone: nn.Module, embeds: Tensor, select: Tensor, probe: CrossAttentionProbe
    ) -> None:
        super().__init__()
        self.unet = backbone.unet
        self.embeds = embeds  # (P + 1, L, D)
        self.select = select  # (P, K, L): 1 where a token belongs to a concept
        self.null_label = len(embeds) - 1
        self.probe = probe
        self.masses: list[Tensor] = []  # per call: (n, heads, K) for the conditional rows
        self.states: list[tuple[Tensor, Tensor]] | None = None  # (x_t, t) per call when kept
        self.mass_error = 0.0  # largest |sum over tokens of a head's masses - 1|

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.probe.recording = True
        eps = self.unet(x, t, encoder_hidden_states=self.embeds[y]).sample
        taken = self.probe.take()
        cond = y != self.null_label
        mass = torch.cat([taken[layer] for layer in self.probe.layers], dim=1)[cond]
        self.mass_error = max(self.mass_error, float((mass.double().sum(-1) - 1).abs().max()))
        sel = self.select.to(mass.device)[y[cond]]
        self.masses.append(torch.einsum("bhl,bkl->bhk", mass.double(), sel.double()).cpu())
        if self.states is not None:
            self.states.append((x[cond].clone(), t[cond].clone()))
        return eps


@dataclass
class Trace:
    """What sampling a set of (prompt, image) samples gave."""

    masses: Tensor  # (N, steps, heads, K) float64 concept masses
    final: Tensor  # (N, C, h, w) final latents
    states: list[tuple[Tensor, Tensor]] | None  # per step: (x_t (N, ...), t (N,)) when kept

    @property
    def shares(self) -> Tensor:
        return self.masses / self.masses.sum(-1, keepdim=True)


class Tracer:
    """Samples (prompt, image) pairs with fixed noise per image index and records every
    conditional forward's concept masses."""

    def __init__(
        self,
        model: nn.Module,
        conditioned: PromptConditioned,
        sampler: Any,
        guidance: float,
        seed: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        show_progress: bool,
    ) -> None:
        self.model, self.net, self.sampler = model, conditioned, sampler
        self.guidance, self.seed, self.batch = float(guidance), int(seed), max(1, int(batch))
        self.device, self.dtype, self.show_progress = device, dtype, show_progress

    def noise(self, image: int) -> Tensor:
        """The initial latent of image ``image``: the same for every prompt (common random
        numbers: prompts, orders, ablations and lora scales are compared on the same noise)."""
        g = torch.Generator().manual_seed(stream_seed(self.seed, _NOISE, image))
        return torch.randn(self.model.latent_shape, generator=g)

    def run(self, samples: Sequence[tuple[int, int]], keep_states: bool = False, desc: str = ""):
        masses, finals, states = [], [], []
        chunks = [samples[i : i + self.batch] for i in range(0, len(samples), self.batch)]
        for chunk in progress(chunks, desc or "concept attention", self.show_progress):
            y = torch.tensor([p for p, _ in chunk], device=self.device)
            x = torch.stack([self.noise(i) for _, i in chunk]).to(self.device, self.dtype)
            self.net.masses, self.net.states = [], [] if keep_states else None
            finals.append(
                self.sampler.sample(self.net, x, y, self.guidance, clamp=False).float().cpu()
            )
            masses.append(torch.stack(self.net.masses, dim=1))  # (n, steps, heads, K)
            if keep_states:
                states.append(self.net.states)
        kept = None
        if keep_states:  # per step, the chunks' states concatenated
            kept = [
                (torch.cat([c[s][0] for c in states]), torch.cat([c[s][1] for c in states]))
                for s in range(len(states[0]))
            ]
        return Trace(torch.cat(masses), torch.cat(finals), kept)

    def eps_at(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The guided noise prediction on given states, with its concept masses (heads, K)."""
        from lt_diffusion.diffusion import guided_eps

        eps, masses = [], []
        for i in range(0, len(y), self.batch):
            sl = slice(i, i + self.batch)
            self.net.masses, self.net.states = [], None
            eps.append(guided_eps(self.net, x[sl], t[sl], y[sl], self.guidance).float().cpu())
            masses.append(self.net.masses[0])
        return torch.cat(eps), torch.cat(masses)


# ----------------------------------------------------------------------------------------------
# Summaries


def saturation(curve: Sequence[float], level: float) -> int:
    """The first step at which ``curve`` has covered ``level`` of its rise from step 0 to its
    maximum (0 when it never rises)."""
    start, top = curve[0], max(curve)
    if top <= start:
        return 0
    threshold = start + level * (top - start)
    return next(i for i, v in enumerate(curve) if v >= threshold - 1e-12)


def wins(a: Tensor, b: Tensor) -> Tensor:
    """1 where ``a > b``, 0.5 where equal, 0 where below."""
    return (a > b).double() + 0.5 * (a == b).double()


def _gap(shares: Tensor, dominant: Tensor) -> Tensor:
    """Share of the dominant concept minus the mean share of the others, ``shares`` (..., K)
    with ``dominant`` (...) broadcast over the leading dimensions."""
    k = shares.shape[-1]
    dom = shares.gather(-1, dominant.unsqueeze(-1)).squeeze(-1)
    return dom - (1.0 - dom) / (k - 1)


def dominance(shares: Tensor) -> tuple[Tensor, Tensor]:
    """From shares ``(P, images, steps, heads, K)``: each prompt's share by step ``(P, steps,
    K)`` (mean over images and heads) and its dominant concept ``(P,)`` (largest mean over the
    trajectory)."""
    by_step = shares.mean(dim=(1, 3))
    return by_step, by_step.mean(1).argmax(-1)


def head_bias(shares: Tensor, dominant: Tensor) -> Tensor:
    """Per head ``(heads,)``: its share of each prompt's dominant concept minus the mean share
    of the others, averaged over prompts, images and steps (how much the head favours the
    concept that dominates)."""
    p, n_img, n_steps, n_heads, _ = shares.shape
    dom = dominant.view(-1, 1, 1, 1).expand(p, n_img, n_steps, n_heads)
    return _gap(shares, dom).mean(dim=(0, 1, 2))


def _per_layer(values: Tensor, layers: Sequence[str], heads: dict[str, int]) -> list[list[float]]:
    """Split a per-head vector (heads of all layers in order) into one list per layer."""
    out, start = [], 0
    for layer in layers:
        out.append([float(v) for v in values[start : start + heads[layer]]])
        start += heads[layer]
    return out


def _clip_scores(
    scorer: ClipScorer | None, model: nn.Module, latents: Tensor, texts: list[str]
) -> Tensor | None:
    """CLIP similarity ``(N, T)`` of the decoded latents with ``texts`` (None without CLIP)."""
    if scorer is None:
        return None
    from lt_diffusion.diffusion import to_uint8

    out = []
    for i in range(0, len(latents), 16):
        part = latents[i : i + 16].to(model.prompt_embeds.device, model_dtype(model))
        out.append(to_uint8(model.decode_latents(part)).cpu())
    return scorer.similarity(torch.cat(out), texts)


def compute(
    run: AnalysedRun,
    settings: ConceptDominanceSettings,
    batch_size: int,
    show_progress: bool,
) -> dict[str, Any]:
    """Trace every prompt's concept attention, summarise dominance, score presence with CLIP
    when staged, relate dominance to the concepts' training frequency, ablate heads."""
    from lt_diffusion.diffusion import DDIMSampler
    from lt_diffusion.runs.build import check_guidance

    model, device = run.model, run.device
    names = [str(n) for n in run.info["class_names"]]
    counts = [int(n) for n in run.info["class_counts"]]
    prompts = build_prompts(read_prompt_set(settings.prompt_set), names)
    texts = [p.text for p in prompts]
    ids = model.tokenize(texts)
    tokenizer = model.tokenizer()

    def word_ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    positions = [concept_positions(p, row.tolist(), word_ids) for p, row in zip(prompts, ids)]
    k = len(prompts[0].concepts)
    select = torch.zeros(len(prompts), k, ids.shape[1])
    for p, pos in enumerate(positions):
        for c, where in enumerate(pos):
            select[p, c, where] = 1.0
    guidance = float(
        run.train_cfg.sampler.guidance if settings.guidance is None else settings.guidance
    )
    check_guidance(run.train_cfg, guidance, str(run.meta["checkpoint"]), "analysis.guidance")
    folder = clip_folder(settings.clip)
    scorer = ClipScorer(folder, device) if folder is not None else None
    dtype = model_dtype(model)
    embeds = model.encode_prompts([*texts, ""]).to(device, dtype)
    sampler = DDIMSampler(run.schedule, steps=settings.steps, eta=0.0, clip_denoised=False)
    n_img = int(settings.images_per_prompt)
    samples = [(p, i) for p in range(len(prompts)) for i in range(n_img)]

    with (
        lora_scaled(model, settings.lora_scale),
        CrossAttentionProbe(model.unet) as probe,
        torch.inference_mode(),
    ):
        net = PromptConditioned(model, embeds, select, probe)
        tracer = Tracer(model, net, sampler, guidance, settings.seed, batch_size // 2 or 1,
                        device, dtype, show_progress)  # fmt: skip
        total_heads = sum(probe.heads.values())
        too_big = [g for g in settings.group_sizes if g > total_heads]
        if settings.ablation_prompts and too_big:
            raise ValueError(
                f"analysis.group_sizes {too_big} exceed the U-Net's {total_heads} cross-attention "
                f"heads: use sizes up to {total_heads}"
            )
        base = tracer.run(samples)
        shares = base.shares.view(len(prompts), n_img, len(sampler.timesteps), total_heads, k)
        clip = _clip_scores(scorer, model, base.final, [
            model.prompt_template.format(c.replace("_", " ")) for c in _concepts(prompts)
        ])  # fmt: skip
        results = _summaries(prompts, positions, shares, sampler.timesteps, settings, names,
                             counts, clip, probe)  # fmt: skip
        results["token_mass_sum_max_error"] = net.mass_error
        results["ablation"] = (
            _ablations(prompts, shares, tracer, probe, settings, scorer, model)
            if settings.ablation_prompts
            else None
        )
    results["guidance"] = guidance
    results["sampler"] = {"name": f"ddim{settings.steps}", "eta": 0.0, "steps": settings.steps}
    results["clip"] = {"folder": None if folder is None else str(folder),
                       "unavailable": None if scorer is not None else NOT_STAGED}  # fmt: skip
    return results


def _concepts(prompts: Sequence[ConceptPrompt]) -> list[str]:
    """Every concept named by the prompts, once, in order of first appearance."""
    return list(dict.fromkeys(c for p in prompts for c in p.concepts))


def _summaries(
    prompts: Sequence[ConceptPrompt],
    positions: list[list[list[int]]],
    shares: Tensor,  # (P, images, steps, heads, K)
    timesteps: Sequence[int],
    settings: ConceptDominanceSettings,
    names: list[str],
    counts: list[int],
    clip: Tensor | None,  # (P * images, concepts) or None
    probe: CrossAttentionProbe,
) -> dict[str, Any]:
    concepts = _concepts(prompts)
    n_prompts, n_img, n_steps, _, k = shares.shape
    by_step, dominant = dominance(shares)
    image_share = shares.mean(dim=(2, 3))  # (P, images, K)
    last = max(n_steps - 1, 1)
    per_prompt = []
    for p, prompt in enumerate(prompts):
        d = int(dominant[p])
        curve = [float(v) for v in by_step[p, :, d]]
        others = (1.0 - by_step[p, :, d]) / (k - 1)
        sat = saturation(curve, settings.saturation)
        layer_share = []
        start = 0
        for layer in probe.layers:
            h = probe.heads[layer]
            layer_share.append(_rows(shares[p, :, :, start : start + h].mean(dim=(0, 1, 2))))
            start += h
        entry: dict[str, Any] = {
            "text": prompt.text,
            "concepts": list(prompt.concepts),
            "token_positions": positions[p],
            "dominant": d,
            "share_by_step": _rows(by_step[p]),
            "share_by_layer": layer_share,
            "image_share": _rows(image_share[p]),
            "share_gap": float(_gap(by_step[p].mean(0), dominant[p])),
            "saturation_step": sat,
            "saturation_t": int(timesteps[sat]),
            "saturation_fraction": sat / last,
            "suppression": float(others[0] - others[-1]),
        }
        if clip is not None:
            cols = [concepts.index(c) for c in prompt.concepts]
            entry["clip_similarity"] = _rows(clip[p * n_img : (p + 1) * n_img][:, cols])
        per_prompt.append(entry)

    dom_curve = torch.stack([by_step[p, :, dominant[p]] for p in range(n_prompts)])
    return {
        "concepts_per_prompt": k,
        "images_per_prompt": n_img,
        "timesteps": [int(t) for t in timesteps],
        "layers": list(probe.layers),
        "heads": [probe.heads[layer] for layer in probe.layers],
        "prompts": per_prompt,
        "dominant_share_by_step": [float(v) for v in dom_curve.mean(0)],
        "dominated_share_by_step": [float(v) for v in ((1 - dom_curve) / (k - 1)).mean(0)],
        "head_bias": _per_layer(head_bias(shares, dominant), probe.layers, probe.heads),
        "mean_share_gap": _mean(e["share_gap"] for e in per_prompt),
        "mean_saturation_fraction": _mean(e["saturation_fraction"] for e in per_prompt),
        "mean_suppression": _mean(e["suppression"] for e in per_prompt),
        **_frequency(prompts, per_prompt, names, counts, clip is not None),
    }


def _frequency(
    prompts: Sequence[ConceptPrompt],
    per_prompt: list[dict[str, Any]],
    names: list[str],
    counts: list[int],
    with_clip: bool,
) -> dict[str, Any]:
    """Pairwise dominance rates, per-concept win rates and their relation to frequency."""
    count_of = {n: c for n, c in zip(names, counts)}
    scores = {"attention": "image_share", **({"clip": "clip_similarity"} if with_clip else {})}
    pair_wins: dict[tuple[str, str], dict[str, list[float]]] = {}
    concept_wins: dict[str, dict[str, list[float]]] = {}
    frequent: dict[str, list[float]] = {s: [] for s in scores}
    for prompt, entry in zip(prompts, per_prompt):
        for a, b in itertools.combinations(range(len(prompt.concepts)), 2):
            ca, cb = prompt.concepts[a], prompt.concepts[b]
            na, nb = count_of.get(ca), count_of.get(cb)
            ranked = na is not None and nb is not None and na != nb
            # the pair is keyed with its more frequent concept first (else alphabetically)
            first_a = na > nb if ranked else ca <= cb
            key = (ca, cb) if first_a else (cb, ca)
            for source, column in scores.items():
                x = torch.tensor(entry[column], dtype=torch.float64)
                w = wins(x[:, a], x[:, b])  # per image: a over b
                w_first = w if first_a else 1.0 - w
                pair_wins.setdefault(key, {}).setdefault(source, []).extend(w_first.tolist())
                concept_wins.setdefault(ca, {}).setdefault(source, []).extend(w.tolist())
                concept_wins.setdefault(cb, {}).setdefault(source, []).extend((1 - w).tolist())
                if ranked:
                    frequent[source].extend(w_first.tolist())
    pairs = [
        {
            "concepts": list(key),
            "comparisons": len(v["attention"]),
            "first_dominates": {s: _mean(v.get(s, [])) for s in ("attention", "clip")},
        }
        for key, v in pair_wins.items()
    ]
    per_concept = []
    for c in _concepts(prompts):
        per_concept.append({
            "concept": c,
            "class_index": names.index(c) if c in names else None,
            "count": count_of.get(c),
            "win_rate": {s: _mean(concept_wins.get(c, {}).get(s, [])) for s in ("attention", "clip")},
        })  # fmt: skip
    classes = [e for e in per_concept if e["count"] is not None]
    spearman = {
        s: rank_correlation([e["win_rate"][s] for e in classes], [e["count"] for e in classes])
        for s in ("attention", "clip")
    }
    return {
        "pairs": pairs,
        "per_concept": per_concept,
        "frequent_dominates": {s: _mean(frequent.get(s, [])) for s in ("attention", "clip")},
        "frequent_comparisons": len(frequent["attention"]),
        "spearman_win_rate_vs_count": spearman,
    }


def _ablations(
    prompts: Sequence[ConceptPrompt],
    shares: Tensor,  # (P, images, steps, heads, K)
    tracer: Tracer,
    probe: CrossAttentionProbe,
    settings: ConceptDominanceSettings,
    scorer: ClipScorer | None,
    model: nn.Module,
) -> dict[str, Any]:
    """Single-head ablations on the baseline trajectory and group ablations over whole ones,
    on the ``ablation_prompts`` prompts with the largest share gap."""
    n_prompts, n_img, n_steps, n_heads, k = shares.shape
    by_step, dominant = dominance(shares)
    gaps = torch.stack([_gap(by_step[p].mean(0), dominant[p]) for p in range(n_prompts)])
    chosen = gaps.argsort(descending=True)[: settings.ablation_prompts].tolist()
    samples = [(p, i) for p in chosen for i in range(n_img)]
    dom = torch.tensor([int(dominant[p]) for p, _ in samples])
    base = tracer.run(samples, keep_states=True, desc="ablation baseline")
    steps = sorted({round(j * (n_steps - 1) / max(settings.ablation_steps - 1, 1))
                    for j in range(settings.ablation_steps)})  # fmt: skip
    y = torch.tensor([p for p, _ in samples], device=tracer.device)

    def at_steps() -> tuple[list[Tensor], list[Tensor]]:
        eps, masses = [], []
        for s in steps:
            x, t = base.states[s]
            e, m = tracer.eps_at(x, t, y)
            eps.append(e)
            masses.append(m)
        return eps, masses

    eps0, m0 = at_steps()
    heads = probe.head_index()
    single = []
    for layer, h in progress(heads, "single-head ablations", tracer.show_progress):
        with probe.ablated([(layer, h)]):
            eps1, m1 = at_steps()
        d_share, d_dom, d_other, d_eps = [], [], [], []
        for e0, e1, a, b in zip(eps0, eps1, m0, m1):
            idx = dom.view(-1, 1, 1).expand(-1, n_heads, 1)
            sa, sb = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
            d_share.append((sb.gather(-1, idx) - sa.gather(-1, idx)).mean(dim=(1, 2)))
            dm = b.mean(1) - a.mean(1)  # (N, K): change of each concept's mass
            d_dom.append(dm.gather(1, dom.view(-1, 1)).squeeze(1))
            d_other.append((dm.sum(1) - d_dom[-1]) / (k - 1))
            d_eps.append((e1 - e0).flatten(1).norm(dim=1) / e0.flatten(1).norm(dim=1))
        single.append({
            "layer": layer, "head": h,
            "delta_dominant_share": float(torch.cat(d_share).mean()),
            "delta_dominant_mass": float(torch.cat(d_dom).mean()),
            "delta_dominated_mass": float(torch.cat(d_other).mean()),
            "relative_eps_change": float(torch.cat(d_eps).mean()),
        })  # fmt: skip

    bias = head_bias(shares, dominant)
    base_share = base.shares.mean(dim=(1, 2))  # (N, K) trajectory share per image
    base_clip = _clip_scores(scorer, model, base.final, _texts(prompts, chosen, model))
    groups = []
    for size in settings.group_sizes:
        g = torch.Generator().manual_seed(stream_seed(settings.seed, _GROUP, size))
        picks = {
            "top": bias.argsort(descending=True)[:size].tolist(),
            "random": torch.randperm(n_heads, generator=g)[:size].tolist(),
        }
        for kind, idx in picks.items():
            group = [heads[i] for i in sorted(idx)]
            with probe.ablated(group):
                abl = tracer.run(samples, desc=f"ablate {kind} {size}")
            share = abl.shares.mean(dim=(1, 2))
            winner0, winner1 = base_share.argmax(-1), share.argmax(-1)
            entry = {
                "kind": kind,
                "size": size,
                "heads": [[layer, h] for layer, h in group],
                "delta_share_gap": float((_gap(share, dom) - _gap(base_share, dom)).mean()),
                "attention_flip_rate": float((winner0 != winner1).double().mean()),
                "relative_latent_change": float(
                    (
                        (abl.final - base.final).flatten(1).norm(dim=1)
                        / base.final.flatten(1).norm(dim=1)
                    ).mean()
                ),  # fmt: skip
                "clip_flip_rate": None,
            }
            if base_clip is not None:
                clip = _clip_scores(scorer, model, abl.final, _texts(prompts, chosen, model))
                entry["clip_flip_rate"] = float(
                    (_clip_winner(base_clip, prompts, chosen, n_img)
                     != _clip_winner(clip, prompts, chosen, n_img)).double().mean()
                )  # fmt: skip
            groups.append(entry)
    largest = max(abs(s["delta_dominant_share"]) for s in single)
    return {
        "prompts": chosen,
        "steps": steps,
        "single_heads": single,
        "max_single_head_delta_share": largest,
        "groups": groups,
    }


def _texts(prompts: Sequence[ConceptPrompt], chosen: list[int], model: nn.Module) -> list[str]:
    concepts = _concepts([prompts[p] for p in chosen])
    return [model.prompt_template.format(c.replace("_", " ")) for c in concepts]


def _clip_winner(
    scores: Tensor, prompts: Sequence[ConceptPrompt], chosen: list[int], n_img: int
) -> Tensor:
    """Per image, the index (within its prompt) of the concept CLIP scores highest."""
    concepts = _concepts([prompts[p] for p in chosen])
    out = []
    for j, p in enumerate(chosen):
        cols = [concepts.index(c) for c in prompts[p].concepts]
        out.append(scores[j * n_img : (j + 1) * n_img][:, cols].argmax(-1))
    return torch.cat(out)


def _rows(x: Tensor) -> list[Any]:
    return x.tolist() if x.ndim > 0 else float(x)


def _mean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return finite_or_none(sum(vals) / len(vals)) if vals else None


# ----------------------------------------------------------------------------------------------
# The record: validated before it is written


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


# ----------------------------------------------------------------------------------------------
# The plot


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Four panels: the dominant and dominated shares over the sampling steps; each head's bias
    towards the dominant concept; the head ablations; each class's win rate against its
    training count."""
    import numpy as np

    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    res, ds = record["results"], record["dataset"]
    fig, (ax1, ax2, ax3, ax4) = new_figure(4)
    steps = range(len(res["timesteps"]))
    ax1.plot(steps, res["dominant_share_by_step"], label="dominant concept", color="tab:red")
    ax1.plot(steps, res["dominated_share_by_step"], label="dominated (mean)", color="tab:blue")
    ax1.set_xlabel("sampling step (t from T to 0)")
    ax1.set_ylabel("concept share of cross-attention")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax1.set_title(title_of(record, f"mean share gap {res['mean_share_gap']:.3f}"), fontsize=9)

    width = max(res["heads"])
    grid = np.full((len(res["layers"]), width), np.nan)
    for i, row in enumerate(res["head_bias"]):
        grid[i, : len(row)] = row
    im = ax2.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    ax2.set_yticks(range(len(res["layers"])))
    ax2.set_yticklabels([_short(layer) for layer in res["layers"]], fontsize=6)
    ax2.set_xlabel("head")
    ax2.set_title("head bias towards the dominant concept", fontsize=9)
    fig.colorbar(im, ax=ax2)

    ab = res.get("ablation")
    if ab:
        single = sorted(s["delta_dominant_share"] for s in ab["single_heads"])
        ax3.plot(range(len(single)), single, ".", color="gray", label="single heads (sorted)")
        for g in ab["groups"]:
            ax3.axhline(g["delta_share_gap"], ls="-" if g["kind"] == "top" else ":",
                        label=f"{g['kind']} {g['size']} heads: gap change")  # fmt: skip
        ax3.set_ylabel("change of the dominant concept's share")
        ax3.legend(fontsize=7)
    else:
        ax3.text(0.5, 0.5, "no head ablations (ablation_prompts: 0)", ha="center")
    ax3.set_title("head ablations", fontsize=9)

    counts, splits, names = ds["class_counts"], ds["splits"], ds.get("class_names")
    values: list[float | None] = [None] * len(counts)
    for e in res["per_concept"]:
        if e["class_index"] is not None:
            values[e["class_index"]] = e["win_rate"]["attention"]
    scatter_vs_count(ax4, values, counts, splits, names)
    rho = res["spearman_win_rate_vs_count"]["attention"]
    ax4.set_ylabel("win rate (attention)")
    ax4.set_title("dominance vs frequency" + (f", Spearman {rho:.2f}" if rho is not None else ""),
                  fontsize=9)  # fmt: skip
    ax4.legend(fontsize=8)
    return save_figure(fig, path)


def _short(layer: str) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0.attn2`` -> ``down0.1``."""
    parts = layer.split(".")
    stage = parts[0].replace("_blocks", "").replace("_block", "")
    nums = [p for p in parts[1:] if p.isdigit()]
    if stage == "mid":
        return f"mid.{nums[0]}" if nums else "mid"
    return f"{stage}{nums[0]}.{nums[1]}" if len(nums) > 1 else stage
