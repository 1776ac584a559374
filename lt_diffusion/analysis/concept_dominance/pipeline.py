"""Concept dominance: the analysis (:func:`compute`): the prompts sampled with the probe, then
its three parts: per-prompt summaries, dominance against concept frequency, head ablations."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
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
from lt_diffusion.analysis.concept_dominance.measures import (
    dominance,
    head_bias,
    per_layer,
    saturation,
    share_gap,
    wins,
)
from lt_diffusion.analysis.concept_dominance.settings import GROUP_STREAM, ConceptDominanceSettings
from lt_diffusion.analysis.concept_dominance.tracing import (
    PromptConditioned,
    Tracer,
    lora_scaled,
)
from lt_diffusion.analysis.prompts import (
    ConceptPrompt,
    build_prompts,
    concept_positions,
    read_prompt_set,
)
from lt_diffusion.data.datamodule import stream_seed


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
            "share_gap": float(share_gap(by_step[p].mean(0), dominant[p])),
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
        "head_bias": per_layer(head_bias(shares, dominant), probe.layers, probe.heads),
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
    gaps = torch.stack([share_gap(by_step[p].mean(0), dominant[p]) for p in range(n_prompts)])
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
        g = torch.Generator().manual_seed(stream_seed(settings.seed, GROUP_STREAM, size))
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
                "delta_share_gap": float(
                    (share_gap(share, dom) - share_gap(base_share, dom)).mean()
                ),
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
