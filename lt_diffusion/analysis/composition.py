"""Composition success on the synthetic two-concept dataset (the IMBA paper's success rate,
decided exactly; :mod:`lt_diffusion.data.concept_pairs`).

For every concept pair ``(a, b)`` the run's model generates ``samples_per_pair`` samples
conditioned on the pair (DDIM, ``steps`` steps, guidance ``w``, fixed seed), and the data's
generative rule decides which concept each token shows
(:meth:`~lt_diffusion.data.concept_pairs.ConceptPairs.shown`). A sample **composes** the pair
when token 0 shows ``a`` and token 1 shows ``b``; the pair's **success rate** is the share that
does (a true draw succeeds with probability ``hit_quantile^2``, 0.98). Reported per pair and
as means over the pairs of vocabulary B's tail concepts (``tail``: the concepts the step
profile makes rare, also in a balanced run, so rows of one table compare the same pairs), its
head concepts (``head``) and all pairs (``overall``). Also per pair: how often each token shows
its concept, how often the tail concept is replaced by a head one (concept neglect), and the
**shift** of the composing samples, ``||mean - mu_(a,b)|| / std`` (0 for a perfect model up to
sampling error ~ ``sqrt(4 / n)``): a displaced distribution, the colour shift the paper sees
at large gamma.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lt_diffusion.analysis.common import AnalysedRun, finite_or_none

NAME = "composition"
GROUPS = ("overall", "head", "tail")


@dataclass(frozen=True)
class CompositionSettings:
    """Settings of the composition analysis (configs/analysis/composition.yaml)."""

    samples_per_pair: int = 200
    steps: int = 50
    guidance: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("samples_per_pair", "steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"analysis.{key} must be an integer >= 1, got {value!r}")
        if self.guidance is not None and not np.isfinite(float(self.guidance)):
            raise ValueError(f"analysis.guidance must be a number or null, got {self.guidance}")


def pair_table(run: AnalysedRun) -> tuple[Any, list[tuple[int, int]]]:
    """The run's generative rule and the concept pair of each class (label order); a clear
    error for a run of another dataset."""
    from lt_diffusion.data.concept_pairs import ConceptPairSource

    source = getattr(run.datamodule, "source", None)
    if not isinstance(source, ConceptPairSource):
        raise ValueError(
            f"{run.meta['checkpoint']} is a run of {run.info['name']}: the composition analysis "
            "needs the synthetic two-concept data (dataset=concept_pairs); for Stable Diffusion "
            "use analysis=prompt_composition"
        )
    return source.rule, [source.pairs[int(o)] for o in run.datamodule.perm]


def group_mean(entries: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Mean of ``key`` over the pairs of each group (undefined values left out)."""
    out: dict[str, float | None] = {}
    for group in GROUPS:
        vals = [e[key] for e in entries if group in ("overall", e["group"]) and e[key] is not None]
        out[group] = finite_or_none(float(np.mean(vals))) if vals else None
    return out


def shift_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean shift per group, and why a group has none (no sample of its pairs composes)."""
    out: dict[str, Any] = group_mean(entries, "shift")
    empty = [g for g in GROUPS if out[g] is None]
    out["unavailable"] = (
        f"no generated sample of the {' / '.join(empty)} pairs composes its pair: the shift of "
        "composing samples is undefined there"
        if empty
        else None
    )
    return out


def score_pairs(
    rule: Any,
    pairs: list[tuple[int, int]],
    counts: list[int],
    points: np.ndarray,
    labels: np.ndarray,
) -> list[dict[str, Any]]:
    """Per class (pair), what its generated ``points`` (those with ``labels == class``) show."""
    from lt_diffusion.data.concept_pairs import pair_name, tail_concepts

    tail = set(tail_concepts(rule.sizes[1]))
    shown = rule.shown(points)
    entries = []
    for c, (a, b) in enumerate(pairs):
        mine = labels == c
        s = shown[mine]
        ok = (s[:, 0] == a) & (s[:, 1] == b)
        good = points[mine][ok]
        shift = None
        if len(good):
            shift = float(np.linalg.norm(good.mean(0) - rule.mean_of((a, b))) / rule.std)
        neglect = None
        if b in tail:  # its token shows a head concept of B instead
            neglect = float(np.isin(s[:, 1], [k for k in range(rule.sizes[1]) if k not in tail])
                            .mean())  # fmt: skip
        entries.append({
            "pair": pair_name(a, b),
            "concepts": [int(a), int(b)],
            "count": int(counts[c]),
            "group": "tail" if b in tail else "head",
            "n": int(mine.sum()),
            "success": float(ok.mean()),
            "shows_a": float((s[:, 0] == a).mean()),
            "shows_b": float((s[:, 1] == b).mean()),
            "neglect": neglect,
            "shift": shift,
        })  # fmt: skip
    return entries


def compute(
    run: AnalysedRun, settings: CompositionSettings, batch_size: int, show_progress: bool
) -> dict[str, Any]:
    """Generate every pair's samples and score them with the data's rule."""
    from lt_diffusion.diffusion import DDIMSampler, generate_vectors
    from lt_diffusion.runs.build import check_guidance
    from lt_diffusion.utils.threads import torch_threads

    rule, pairs = pair_table(run)
    counts = [int(n) for n in run.info["class_counts"]]
    guidance = float(
        run.train_cfg.sampler.guidance if settings.guidance is None else settings.guidance
    )
    check_guidance(run.train_cfg, guidance, str(run.meta["checkpoint"]), "analysis.guidance")
    sampler = DDIMSampler(run.schedule, steps=int(settings.steps), eta=0.0, clip_denoised=True)
    n = int(settings.samples_per_pair)
    labels = torch.arange(len(pairs)).repeat_interleave(n)
    # The run's own CPU threads (a tiny model samples faster on one; utils/threads.py).
    with torch_threads(run.train_cfg.train.get("threads"), "train.threads"):
        points = generate_vectors(
            run.model, sampler, labels, seed=int(settings.seed), batch_size=int(batch_size),
            guidance=guidance, device=run.device, progress=show_progress,
        ).numpy()  # fmt: skip
    entries = score_pairs(rule, pairs, counts, points, labels.numpy())
    concept_counts = [[0] * k for k in rule.sizes]
    for (a, b), count in zip(pairs, counts):
        concept_counts[0][a] += count
        concept_counts[1][b] += count
    return {
        "samples_per_pair": n,
        "guidance": guidance,
        "sampler": {"name": f"ddim{settings.steps}", "eta": 0.0, "steps": int(settings.steps)},
        "ideal_success": rule.hit_quantile**rule.tokens,
        "pairs": entries,
        "success": group_mean(entries, "success"),
        "shows_b": group_mean(entries, "shows_b"),
        "neglect": group_mean(entries, "neglect")["tail"],
        "shift": shift_summary(entries),
        "concept_counts": {"a": concept_counts[0], "b": concept_counts[1]},
        # A few samples of every pair, for the plot (the record stays small).
        "examples": {
            e["pair"]: points[labels.numpy() == c][:50].round(4).tolist()
            for c, e in enumerate(entries)
        },  # fmt: skip
    }


def validate(record: dict[str, Any]) -> dict[str, Any]:
    """The record, after checking that its rates are in [0, 1] and its groups are complete."""
    if record.get("analysis") != NAME:
        raise ValueError(f"not a {NAME} record (analysis: {record.get('analysis')!r})")
    res = record["results"]
    for e in res["pairs"]:
        for key in ("success", "shows_a", "shows_b", "neglect"):
            value = e.get(key)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"pair {e['pair']}: {key}={value} is not a rate")
    if set(res["success"]) != set(GROUPS):
        raise ValueError(f"success must have the groups {GROUPS}, got {sorted(res['success'])}")
    return record


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Two panels: each pair's success rate against its training count (head / tail
    concepts), and the generated tokens of vocabulary B for the tail pairs over the concepts'
    hit circles (a point in a head concept's circle is a neglected tail concept)."""
    from matplotlib.patches import Circle

    from lt_diffusion.analysis.plots import new_figure, save_figure, title_of
    from lt_diffusion.data.concept_pairs import circle_concepts

    res, src = record["results"], record["config"]["dataset"]["source"]
    rule = circle_concepts((int(src["concepts_a"]), int(src["concepts_b"])), float(src["radius"]),
                           float(src["std"]), float(src["hit_quantile"]))  # fmt: skip
    fig, (ax1, ax2) = new_figure(2)
    colours = {"head": "tab:blue", "tail": "tab:red"}
    for group, colour in colours.items():
        rows = [e for e in res["pairs"] if e["group"] == group]
        ax1.scatter([e["count"] for e in rows], [e["success"] for e in rows], color=colour,
                    label=f"{group} concepts of B (mean {res['success'][group]:.2f})")  # fmt: skip
    ax1.axhline(res["ideal_success"], color="gray", ls=":", label="true data")
    ax1.set_xscale("log")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("training samples of the pair")
    ax1.set_ylabel("composition success rate")
    ax1.legend(fontsize=8)
    ax1.set_title(title_of(record, f"success {res['success']['overall']:.2f}"), fontsize=9)
    for k, (x, y) in enumerate(rule.means[1]):
        tail = k >= rule.sizes[1] - rule.sizes[1] // 2
        ax2.add_patch(Circle((x, y), rule.hit_radius, fill=False, lw=1.5,
                             color=colours["tail" if tail else "head"]))  # fmt: skip
        ax2.annotate(f"b{k}", (x, y), ha="center", va="center", fontsize=8)
    for e in res["pairs"]:
        if e["group"] == "tail":
            pts = np.asarray(res["examples"][e["pair"]])
            ax2.scatter(pts[:, 2], pts[:, 3], s=4, alpha=0.5)
    ax2.set_aspect("equal")
    ax2.set_xlim(-1, 1)
    ax2.set_ylim(-1, 1)
    ax2.set_title("token 1 (vocabulary B) of samples of the tail pairs", fontsize=9)
    return save_figure(fig, path)
