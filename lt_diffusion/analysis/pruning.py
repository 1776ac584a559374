"""Pruning sensitivity per class (the CM paper, Sec. 2.2, Fig. 1(b), eq. G.1).

Zero the ``fraction`` of parameters with the smallest magnitude (the L1 norm of a scalar is
``|w|``) and report, per class ``c``, the relative change of its diffusion loss::

    Relative Loss Change^c = (L^c_pruned - L^c_raw) / L^c_raw                 (eq. G.1)

Definitions used here (the paper does not spell them out):

* **What is pruned** (``scope``): ``conv_linear_weights`` (default) ranks, globally, the
  entries of every ``Conv2d`` / ``Linear`` weight tensor (for a CM model these are the ``W_g``
  parts; its low-rank factors are left alone); ``all`` ranks every parameter entry (biases,
  norms, embeddings, low-rank factors too). Exactly ``k = round(fraction * n)`` entries are
  zeroed, ``n`` the number of ranked entries; among equal magnitudes at the cut the choice is
  arbitrary, the count is not.
* **The loss of a class** is the epsilon-prediction MSE (Ho et al.), conditional on the true
  label, averaged over the class's training images (all, or a seeded subset) and ``draws``
  fixed draws of ``t ~ U{0..T-1}`` and noise per image; raw and pruned models see the same
  draws, so ``fraction = 0`` gives exactly zero change.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.analysis.common import (
    AnalysedRun,
    ClassSamples,
    check_sampling,
    deterministic_kernels,
    finite_or_none,
    model_dtype,
    progress,
    rank_correlation,
    split_means,
)
from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import mse

NAME = "pruning"
SCOPES = ("conv_linear_weights", "all")


@dataclass(frozen=True)
class PruningSettings:
    """Settings of the pruning analysis (configs/analysis/pruning.yaml)."""

    fraction: float = 0.1
    scope: str = "conv_linear_weights"
    images_per_class: int | None = None
    draws: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not 0.0 <= float(self.fraction) < 1.0:
            raise ValueError(
                f"analysis.fraction must be in [0, 1) (the share of weights to zero; the CM "
                f"paper uses 0.1), got {self.fraction!r}"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"analysis.scope must be one of {SCOPES}, got {self.scope!r}")
        check_sampling(self.images_per_class, self.draws)


@dataclass
class PruneStats:
    """What :func:`magnitude_prune_` did."""

    n_ranked: int  # entries ranked by magnitude
    n_pruned: int  # entries set to zero (exactly round(fraction * n_ranked))
    threshold: float | None  # largest |w| that was pruned (None when nothing was)


def prunable_parameters(model: nn.Module, scope: str) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs ranked for pruning, each parameter once (see module doc)."""
    if scope not in SCOPES:
        raise ValueError(f"pruning scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        return list(model.named_parameters())
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        # isinstance: CM's LowRankConv2d / LowRankLinear are Conv2d / Linear; their weight is W_g.
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append((f"{mod_name}.weight" if mod_name else "weight", module.weight))
    if not out:
        raise ValueError("the model has no Conv2d / Linear layer to prune: use scope=all")
    return out


def pruned_count(n: int, fraction: float) -> int:
    """``round(fraction * n)``, halves rounded up."""
    return min(n, math.floor(float(fraction) * n + 0.5))


@torch.no_grad()
def magnitude_prune_(params: Sequence[Tensor], fraction: float) -> PruneStats:
    """Zero, in place, the ``round(fraction * n)`` entries of smallest ``|w|`` over all of
    ``params`` together (a global ranking, not per tensor)."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if not params:
        raise ValueError("nothing to prune: no parameters given")
    flat = torch.cat([p.detach().abs().flatten().float() for p in params])
    k = pruned_count(flat.numel(), fraction)
    if k == 0:
        return PruneStats(flat.numel(), 0, None)
    values, idx = torch.topk(flat, k, largest=False, sorted=False)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    offset = 0
    for p in params:
        n = p.numel()
        p.masked_fill_(mask[offset : offset + n].view_as(p), 0)
        offset += n
    return PruneStats(flat.numel(), k, float(values.max()))


@torch.no_grad()
def class_losses(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
    desc: str = "loss",
) -> list[float | None]:
    """Per class, the mean epsilon-MSE over its fixed draws (float64 accumulation; None for a
    class without images)."""
    dtype = model_dtype(model)
    out: list[float | None] = []
    for c in progress(range(samples.num_classes), desc, show_progress):
        total, n = 0.0, 0
        for b in samples.batches(c, batch_size, device, dtype):
            x_t = schedule.q_sample(b.x0, b.t, b.noise)
            err = mse(model(x_t, b.t, b.y), b.noise, per_sample=True)
            total += float(err.double().sum())
            n += len(err)
        out.append(finite_or_none(total / n) if n else None)  # a diverged model: null
    return out


def relative_change(raw: Sequence[float | None], pruned: Sequence[float | None]) -> list:
    """Eq. G.1 per class: ``(pruned - raw) / raw`` (None where undefined)."""
    return [
        finite_or_none((p - r) / r) if r is not None and p is not None and r > 0 else None
        for r, p in zip(raw, pruned)
    ]


def pruning_sensitivity(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    fraction: float,
    scope: str = "conv_linear_weights",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Per-class losses of ``model`` and of a pruned copy on the same draws (``model`` itself
    is left untouched), the relative change (eq. G.1) and what was pruned."""
    pruned = copy.deepcopy(model)
    stats = magnitude_prune_([p for _, p in prunable_parameters(pruned, scope)], fraction)
    with deterministic_kernels():
        raw = class_losses(model, schedule, samples, batch_size, device, show_progress, "raw")
        after = class_losses(pruned, schedule, samples, batch_size, device, show_progress, "pruned")
    del pruned
    return {
        "prune": {
            "scope": scope,
            "fraction": float(fraction),
            "n_ranked": stats.n_ranked,
            "n_pruned": stats.n_pruned,
            "threshold": stats.threshold,
        },
        "loss_raw": raw,
        "loss_pruned": after,
        "relative_change": relative_change(raw, after),
        "n_samples": [samples.count(c) for c in range(samples.num_classes)],
    }


def compute(
    run: AnalysedRun, settings: PruningSettings, batch_size: int, show_progress: bool
) -> dict[str, Any]:
    """The analysis on a loaded run: per-class results, per-split means, and the rank
    correlation of the relative change with the class count."""
    samples = run.samples(settings.images_per_class, settings.draws, settings.seed)
    res = pruning_sensitivity(
        run.model, run.schedule, samples, settings.fraction, settings.scope,
        batch_size, run.device, show_progress,
    )  # fmt: skip
    change = res["relative_change"]
    return {
        **res,
        "per_split": {"relative_change": split_means(change, run.info["splits"])},
        "spearman_vs_count": rank_correlation(change, run.info["class_counts"]),
    }


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Relative loss change against the class's training count (Fig. 1(b))."""
    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    ds, res = record["dataset"], record["results"]
    fig, (ax,) = new_figure()
    scatter_vs_count(
        ax, res["relative_change"], ds["class_counts"], ds["splits"], ds.get("class_names")
    )
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ax.set_ylabel(r"$(L_{pruned} - L_{raw}) / L_{raw}$")
    pr = res["prune"]
    ax.set_title(
        title_of(record, f"{pr['fraction']:.0%} smallest-|w| pruned ({pr['scope']})"), fontsize=9
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path)
