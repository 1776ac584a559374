"""Gradient dominance of the majority classes (the CM paper, Theorem 2.1, Sec. F.2; Theorem F.1
for the multi-class case; Theorem 3.1 for a model with reserved low-rank capacity).

Theorem 2.1's quantity is the proportion of parameter matrices ``W`` whose update direction is
dominated by the majority class. Its proof (Sec. F.2) defines "dominated": the angle between
the full training gradient ``grad_W L = sum_i g^(i)`` (eq. F.2) and the majority class's
expected gradient ``mu_1`` is smaller than the angle to the minority's ``mu_2``. We measure
exactly that, per parameter tensor, with the expectations estimated on fixed draws:

* ``g_c``: the gradient of class ``c``'s mean diffusion loss (epsilon-MSE with its label, on up
  to ``images_per_class`` training images x ``draws`` fixed draws of ``t`` and noise), the
  estimate of ``mu_c``;
* the full gradient ``G = sum_c N_c g_c`` (eq. F.2 with each class's sum estimated by ``N_c``
  times its mean; ``N_c`` the training count);
* the groups: ``G_maj = sum_{c in majority} N_c g_c`` (default: the Many split) and ``G_min``
  (default: the Few split); cosines are scale-free, so these stand for the group means
  ``mu_maj``, ``mu_min``;
* ``W`` is **dominated by the majority** when ``cos(G_W, G_maj,W) > cos(G_W, G_min,W)``;
  the reported fraction is over the tensors where both cosines are defined (no gradient that is
  zero, or rounding noise: see :func:`zero_tolerance`).

Also reported: the majority's gradient-norm share ``|G_maj| / (|G_maj| + |G_min|)`` per tensor,
and per class ``c`` outside the majority (Theorem F.1: "class ``K`` overwhelmed by class 1") the
fraction of tensors with ``cos(G, G_maj) > cos(G, g_c)`` (None for the majority's own classes,
whose gradient is part of ``G_maj``). Tensors are the parameter matrices of the theorem
(``tensors: matrices``: every parameter with >= 2 dimensions: conv kernels, linear weights,
embeddings, low-rank factors) or every parameter (``all``). For a CM model each result is
given for ``theta_g`` (every parameter but the low-rank factors) and for the low-rank factors
``A``, ``B`` separately (Theorem 3.1's ``W^g`` and ``W^e``), and for all together. The model
runs in eval mode (no dropout) with its full capacity enabled, on a float64 copy by default.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.analysis.common import (
    AnalysedRun,
    ClassSamples,
    check_sampling,
    finite_or_none,
    model_dtype,
    progress,
    rank_correlation,
    split_means,
)
from lt_diffusion.data.splits import SPLITS
from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import mse
from lt_diffusion.models.lowrank import is_lowrank_param

NAME = "gradient_dominance"
SUPPORTS_THETA_G_ONLY = False  # the analysis reports theta_g and the low-rank part itself
TENSOR_SETS = ("matrices", "all")
PARTS = ("all", "theta_g", "lowrank")
# Gradients are computed on a copy of the model in this precision: in float64 a gradient that
# is zero in exact arithmetic stays ~1e-16 of the others and is told apart from small real ones.
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class GradientDominanceSettings:
    """Settings of the gradient-dominance analysis (configs/analysis/gradient_dominance.yaml)."""

    images_per_class: int | None = 16
    draws: int = 1
    seed: int = 0
    majority: list[str] = field(default_factory=lambda: ["many"])
    minority: list[str] = field(default_factory=lambda: ["few"])
    tensors: str = "matrices"
    per_class: bool = True
    dtype: str = "float64"

    def __post_init__(self) -> None:
        check_sampling(self.images_per_class, self.draws)
        for what in ("majority", "minority"):
            splits = list(getattr(self, what))
            if not splits or any(s not in SPLITS for s in splits):
                raise ValueError(
                    f"analysis.{what} must be a non-empty list of splits among {SPLITS}, "
                    f"got {splits!r}"
                )
        both = set(self.majority) & set(self.minority)
        if both:
            raise ValueError(f"a split cannot be both majority and minority: {sorted(both)}")
        if self.tensors not in TENSOR_SETS:
            raise ValueError(f"analysis.tensors must be one of {TENSOR_SETS}, got {self.tensors!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"analysis.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")


def analysed_parameters(model: nn.Module, tensors: str = "matrices") -> list[tuple[str, Tensor]]:
    """The ``(name, parameter)`` pairs analysed: parameters with >= 2 dims, or all."""
    if tensors not in TENSOR_SETS:
        raise ValueError(f"tensors must be one of {TENSOR_SETS}, got {tensors!r}")
    params = [(n, p) for n, p in model.named_parameters() if tensors == "all" or p.ndim >= 2]
    if not params:
        raise ValueError("the model has no parameter matrix: use tensors=all")
    return params


def part_of(name: str) -> str:
    """``lowrank`` for CM's low-rank factors ``A`` / ``B``, else ``theta_g``."""
    return "lowrank" if is_lowrank_param(name) else "theta_g"


@contextmanager
def gradients_enabled(params: Sequence[Tensor]) -> Iterator[None]:
    """``requires_grad`` on ``params`` inside the block (a sampling model has it off)."""
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, state in zip(params, before):
            p.requires_grad_(state)


def class_gradient(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    c: int,
    params: Sequence[Tensor],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[Tensor] | None:
    """``g_c``: the gradient of class ``c``'s mean epsilon-MSE over its fixed draws with
    respect to ``params`` (None for a class without images). Call inside
    :func:`gradients_enabled`."""
    n = samples.count(c)
    if n == 0:
        return None
    grads = [torch.zeros_like(p) for p in params]
    for b in samples.batches(c, batch_size, device, model_dtype(model)):
        x_t = schedule.q_sample(b.x0, b.t, b.noise)
        loss = mse(model(x_t, b.t, b.y), b.noise, per_sample=True).sum() / n
        for acc, g in zip(grads, torch.autograd.grad(loss, list(params), allow_unused=True)):
            if g is not None:  # unused here (e.g. ADA's augmentation projection): zero
                acc.add_(g)
    return grads


def zero_tolerance(grads: Sequence[Tensor]) -> float:
    """Norm below which a tensor's gradient counts as zero: ``100 eps`` (of the gradients'
    dtype) times the largest tensor norm of the family. Some gradients are zero in exact
    arithmetic but rounding noise in practice (e.g. a time projection feeding a GroupNorm with
    one channel per group, whose per-channel shift the norm removes); their cosines would be
    noise, so they count as undefined."""
    eps = torch.finfo(grads[0].dtype).eps
    return 100.0 * eps * max(float(g.double().norm()) for g in grads)


def cosine(a: Tensor, b: Tensor, tol_a: float = 0.0, tol_b: float = 0.0) -> float | None:
    """Cosine of two tensors in float64; None when a norm is at most its tolerance (or not
    finite: a diverged model)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = float(a64.norm()), float(b64.norm())
    if not (math.isfinite(na) and math.isfinite(nb)) or na <= tol_a or nb <= tol_b:
        return None
    return finite_or_none(float(a64 @ b64) / (na * nb))


def _fraction(flags: Sequence[bool | None]) -> float | None:
    defined = [f for f in flags if f is not None]
    return sum(defined) / len(defined) if defined else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    defined = [r for r in rows if r["dominated"] is not None]
    shares = [r["norm_share"] for r in rows if r["norm_share"] is not None]
    numel = sum(r["numel"] for r in defined)
    return {
        "n_tensors": len(rows),
        "n_defined": len(defined),
        "dominated_fraction": _fraction([r["dominated"] for r in rows]),
        # The same, counting parameters (entries) rather than tensors.
        "dominated_fraction_by_numel": (
            sum(r["numel"] for r in defined if r["dominated"]) / numel if numel else None
        ),
        "mean_norm_share": sum(shares) / len(shares) if shares else None,
    }


def gradient_dominance(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    class_counts: Sequence[int],
    splits: Sequence[str],
    majority: Sequence[str] = ("many",),
    minority: Sequence[str] = ("few",),
    tensors: str = "matrices",
    per_class: bool = True,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Per tensor, part and class, the dominance quantities of the module docstring."""
    num_classes = samples.num_classes
    if len(class_counts) != num_classes or len(splits) != num_classes:
        raise ValueError("class_counts and splits need one entry per class")
    maj = [c for c in range(num_classes) if splits[c] in majority and samples.count(c) > 0]
    mnr = [c for c in range(num_classes) if splits[c] in minority and samples.count(c) > 0]
    if not maj or not mnr:
        raise ValueError(
            f"the majority splits {list(majority)} and minority splits {list(minority)} must "
            f"each hold a class with training images (this dataset's splits: {list(splits)})"
        )
    named = analysed_parameters(model, tensors)
    names, params = [n for n, _ in named], [p for _, p in named]

    def grad_of(c: int) -> list[Tensor] | None:
        return class_gradient(model, schedule, samples, c, params, batch_size, device)

    total = [torch.zeros_like(p) for p in params]
    g_maj = [torch.zeros_like(p) for p in params]
    g_min = [torch.zeros_like(p) for p in params]
    class_norm: list[float | None] = [None] * num_classes
    with gradients_enabled(params):
        for c in progress(range(num_classes), "class gradients", show_progress):
            g = grad_of(c)
            if g is None:
                continue
            class_norm[c] = float(torch.sqrt(sum(x.double().pow(2).sum() for x in g)))
            w = float(class_counts[c])
            for acc, x in zip(total, g):
                acc.add_(x, alpha=w)
            for group, members in ((g_maj, maj), (g_min, mnr)):
                if c in members:
                    for acc, x in zip(group, g):
                        acc.add_(x, alpha=w)

        tol_total, tol_maj, tol_min = (zero_tolerance(x) for x in (total, g_maj, g_min))
        rows = []
        for name, p, G, a, b in zip(names, params, total, g_maj, g_min):
            cos_maj, cos_min = cosine(G, a, tol_total, tol_maj), cosine(G, b, tol_total, tol_min)
            na, nb = float(a.double().norm()), float(b.double().norm())
            rows.append(
                {
                    "name": name,
                    "part": part_of(name),
                    "numel": p.numel(),
                    "cos_majority": cos_maj,
                    "cos_minority": cos_min,
                    "dominated": (
                        None if cos_maj is None or cos_min is None else bool(cos_maj > cos_min)
                    ),
                    "norm_share": na / (na + nb) if na + nb > 0 else None,
                }
            )

        parts = {"all": rows}
        if any(r["part"] == "lowrank" for r in rows):
            parts["theta_g"] = [r for r in rows if r["part"] == "theta_g"]
            parts["lowrank"] = [r for r in rows if r["part"] == "lowrank"]

        overwhelmed: dict[str, list[float | None]] = {p: [None] * num_classes for p in parts}
        if per_class:  # second pass: G is known only once every class has been seen
            others = [c for c in range(num_classes) if c not in maj]
            for c in progress(others, "per-class dominance", show_progress):
                g = grad_of(c)
                if g is None:
                    continue
                flags, tol_c = {}, zero_tolerance(g)
                for row, G, gc in zip(rows, total, g):
                    cos_c = cosine(G, gc, tol_total, tol_c)
                    cm = row["cos_majority"]
                    flags[row["name"]] = None if cos_c is None or cm is None else cm > cos_c
                for part, members in parts.items():
                    overwhelmed[part][c] = _fraction([flags[r["name"]] for r in members])

    n_maj = sum(int(class_counts[c]) for c in maj)
    n_min = sum(int(class_counts[c]) for c in mnr)
    return {
        "majority_classes": maj,
        "minority_classes": mnr,
        "majority_ratio": n_maj / (n_maj + n_min),  # Theorem 2.1's a = N_1 / (N_1 + N_2)
        "parts": {part: _summary(members) for part, members in parts.items()},
        "per_class": {
            "overwhelmed_fraction": overwhelmed,
            "grad_norm": [finite_or_none(v) for v in class_norm],
            "n_samples": [samples.count(c) for c in range(num_classes)],
        },
        "per_tensor": rows,
    }


def compute(
    run: AnalysedRun, settings: GradientDominanceSettings, batch_size: int, show_progress: bool
) -> dict[str, Any]:
    """The analysis on a loaded run, with per-split means of the per-class fractions."""
    if run.theta_g_only:
        raise ValueError(
            "gradient_dominance measures the full model (theta_g and the low-rank part "
            "separately): run it without theta_g_only"
        )
    samples = run.samples(settings.images_per_class, settings.draws, settings.seed)
    counts, splits = run.info["class_counts"], run.info["splits"]
    dtype = DTYPES[settings.dtype]
    # Copies: the loaded model stays as it is; the schedule re-derives its float64 constants.
    model = copy.deepcopy(run.model).to(dtype)
    schedule = copy.deepcopy(run.schedule).to(dtype)
    res = gradient_dominance(
        model, schedule, samples, counts, splits, settings.majority, settings.minority,
        settings.tensors, settings.per_class, batch_size, run.device, show_progress,
    )  # fmt: skip
    over = res["per_class"]["overwhelmed_fraction"]
    res["per_split"] = {
        "overwhelmed_fraction": {p: split_means(v, splits) for p, v in over.items()}
    }
    res["spearman_vs_count"] = {p: rank_correlation(v, counts) for p, v in over.items()}
    return res


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Left: per class, the fraction of tensors where it is overwhelmed by the majority,
    against its count; right: the dominated fraction of each part."""
    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    ds, res = record["dataset"], record["results"]
    fig, (ax, ax_bar) = new_figure(2)
    over = res["per_class"]["overwhelmed_fraction"]
    markers = {"all": "o", "theta_g": "s", "lowrank": "^"}
    shown = [p for p in PARTS if p in over and any(v is not None for v in over[p])]
    for part in shown:
        scatter_vs_count(
            ax, over[part], ds["class_counts"], ds["splits"],
            ds.get("class_names") if part == "all" else None,
            marker=markers[part], label_prefix=f"{part}: " if len(shown) > 1 else "",
        )  # fmt: skip
    ax.axhline(0.5, color="gray", lw=1, ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of tensors: cos(G, G_maj) > cos(G, g_c)")
    ax.set_title(title_of(record, "class overwhelmed by the majority (Thm F.1)"), fontsize=9)
    if shown:
        ax.legend(fontsize=7)
    parts = [p for p in PARTS if p in res["parts"]]
    vals = [res["parts"][p]["dominated_fraction"] for p in parts]
    ax_bar.bar(parts, [v if v is not None else 0.0 for v in vals], color="tab:blue")
    for i, v in enumerate(vals):
        ax_bar.annotate("n/a" if v is None else f"{v:.2f}", (i, v or 0.0), ha="center",
                        xytext=(0, 3), textcoords="offset points", fontsize=8)  # fmt: skip
    ax_bar.axhline(0.5, color="gray", lw=1, ls="--")
    ax_bar.set_ylim(0.0, 1.05)
    ax_bar.set_ylabel("share of tensors dominated by the majority")
    ax_bar.set_title(f"Thm 2.1: majority ratio a = {res['majority_ratio']:.3f}", fontsize=9)
    return save_figure(fig, path)
