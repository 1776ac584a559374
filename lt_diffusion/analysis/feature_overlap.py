"""Overlap of classes in the U-Net bottleneck (CORAL, Sec. "latent overlap"; coral.txt).

CORAL's diagnosis is that the bottleneck latents of tail classes overlap those of head classes
("feature borrowing"). We measure the overlap with k-nearest-neighbour label purity:

* features: the bottleneck feature map ``h_mid`` of
  ``UNet.forward(x_t, t, y, return_bottleneck=True)``, averaged over its spatial positions,
  for up to ``images_per_class`` training images of each class noised at one timestep ``t``
  (fixed, seeded noise), conditioned on the true label (``condition: label``, what training
  sees) or on the null label (``condition: null``);
* purity of a sample: the fraction of its ``k`` nearest neighbours (itself excluded; cosine or
  Euclidean distance) that share its label; a class's purity is the mean over its samples.
  A class whose latents sit inside another class's region has low purity. If features carried
  no label information, a sample of class ``c`` would expect ``(n_c - 1) / (N - 1)`` (the
  chance level, reported next to it);
* overlap matrix: ``O[c, c']`` the mean fraction of a class-``c`` sample's neighbours that
  are of class ``c'`` (rows sum to 1; the diagonal is the purity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_diffusion.analysis.common import (
    AnalysedRun,
    ClassSamples,
    check_sampling,
    check_timestep,
    finite_or_none,
    model_dtype,
    progress,
    rank_correlation,
    split_means,
)
from lt_diffusion.diffusion import NoiseSchedule

NAME = "feature_overlap"
METRICS = ("cosine", "euclidean")
CONDITIONS = ("label", "null")


@dataclass(frozen=True)
class FeatureOverlapSettings:
    """Settings of the bottleneck-overlap analysis (configs/analysis/feature_overlap.yaml)."""

    t: int | None = 500
    k: int = 10
    metric: str = "cosine"
    condition: str = "label"
    images_per_class: int | None = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or int(self.k) < 1:
            raise ValueError(f"analysis.k (neighbours) must be >= 1, got {self.k!r}")
        if self.metric not in METRICS:
            raise ValueError(f"analysis.metric must be one of {METRICS}, got {self.metric!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(
                f"analysis.condition must be one of {CONDITIONS}, got {self.condition!r}"
            )
        check_sampling(self.images_per_class, 1)


@torch.no_grad()
def pooled_bottleneck_features(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    condition: str = "label",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(features (N, C_mid) float32 on the CPU, labels (N,))``: spatially averaged ``h_mid``
    of every sample, classes in order."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    dtype = model_dtype(model)
    feats, labels = [], []
    for c in progress(range(samples.num_classes), "features", show_progress):
        for b in samples.batches(c, batch_size, device, dtype):
            x_t = schedule.q_sample(b.x0, b.t, b.noise)
            y = b.y if condition == "label" else None
            _, h_mid = model(x_t, b.t, y, return_bottleneck=True)
            feats.append(h_mid.float().mean(dim=(2, 3)).cpu())
            labels.append(b.y.cpu())
    if not feats:
        raise ValueError("no training images to featurise")
    return torch.cat(feats), torch.cat(labels)


def knn_indices(features: Tensor, k: int, metric: str = "cosine", chunk: int = 1024) -> Tensor:
    """``(N, k)`` indices of each row's ``k`` nearest other rows (itself excluded), nearest
    first, computed in float64 in row chunks."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(
            f"k={k} neighbours need at least k + 1 = {k + 1} samples, got {n}: lower "
            "analysis.k or raise analysis.images_per_class"
        )
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = features.double()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    out = []
    for start in range(0, n, chunk):
        rows = x[start : start + chunk]
        dist = 1.0 - rows @ x.T if metric == "cosine" else torch.cdist(rows, x)
        own = torch.arange(start, start + len(rows))
        dist[torch.arange(len(rows)), own] = float("inf")  # a sample is not its own neighbour
        out.append(torch.topk(dist, k, dim=1, largest=False).indices)
    return torch.cat(out)


def knn_label_purity(
    features: Tensor, labels: Tensor, k: int, metric: str = "cosine"
) -> tuple[Tensor, Tensor]:
    """Per sample, the fraction of its ``k`` nearest neighbours with its label (float64 (N,)),
    and the neighbours' labels ``(N, k)``."""
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    neighbour_labels = labels[knn_indices(features, k, metric)]
    purity = (neighbour_labels == labels[:, None]).double().mean(1)
    return purity, neighbour_labels


def overlap_matrix(labels: Tensor, neighbour_labels: Tensor, num_classes: int) -> Tensor:
    """``O[c, c']``: mean over class-``c`` samples of the fraction of their neighbours in class
    ``c'`` (float64 ``(C, C)``; a row of zeros for a class without samples)."""
    k = neighbour_labels.shape[1]
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    rows = labels[:, None].expand_as(neighbour_labels).flatten()
    counts.index_put_((rows, neighbour_labels.flatten()), torch.ones(rows.numel()).double(), True)
    per_class = torch.bincount(labels, minlength=num_classes).double()
    return counts / (per_class[:, None] * k).clamp_min(1.0)


def chance_purity(labels: Tensor, num_classes: int) -> list[float | None]:
    """Expected purity of class ``c`` if features carried no label: ``(n_c - 1) / (N - 1)``."""
    n = torch.bincount(labels, minlength=num_classes).tolist()
    total = len(labels)
    return [(m - 1) / (total - 1) if m > 0 and total > 1 else None for m in n]


def per_class_purity(purity: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Mean purity of each class's samples (None for a class without samples)."""
    out = []
    for c in range(num_classes):
        sel = purity[labels == c]
        out.append(finite_or_none(sel.mean()) if len(sel) else None)
    return out


def compute(
    run: AnalysedRun, settings: FeatureOverlapSettings, batch_size: int, show_progress: bool
) -> dict[str, Any]:
    """Features, purity per class and per split, chance levels and the overlap matrix."""
    if not hasattr(run.model, "bottleneck_channels"):
        raise ValueError(
            f"{type(run.model).__name__} exposes no bottleneck (return_bottleneck=True): this "
            "analysis needs the pixel U-Net"
        )
    t = check_timestep(settings.t, run.schedule.num_timesteps, "analysis.t")
    samples = run.samples(settings.images_per_class, 1, settings.seed, t)
    feats, labels = pooled_bottleneck_features(
        run.model, run.schedule, samples, settings.condition, batch_size, run.device,
        show_progress,
    )  # fmt: skip
    num_classes = int(run.info["num_classes"])
    purity, neighbours = knn_label_purity(feats, labels, settings.k, settings.metric)
    per_class = per_class_purity(purity, labels, num_classes)
    matrix = overlap_matrix(labels, neighbours, num_classes)
    return {
        "t": t,
        "feature_dim": int(feats.shape[1]),
        "purity": per_class,
        "chance_purity": chance_purity(labels, num_classes),
        "n_samples": torch.bincount(labels, minlength=num_classes).tolist(),
        "overall_purity": finite_or_none(purity.mean()),
        "per_split": {"purity": split_means(per_class, run.info["splits"])},
        "spearman_vs_count": rank_correlation(per_class, run.info["class_counts"]),
        "overlap_matrix": [[round(float(v), 6) for v in row] for row in matrix],
    }


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Purity against class count (with chance level), and the overlap matrix."""
    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    ds, res, st = record["dataset"], record["results"], record["settings"]
    fig, (ax, ax_m) = new_figure(2)
    counts = ds["class_counts"]
    scatter_vs_count(ax, res["purity"], counts, ds["splits"], ds.get("class_names"))
    chance = [(max(n, 1), v) for n, v in zip(counts, res["chance_purity"]) if v is not None]
    if chance:
        xs, ys = zip(*sorted(chance))
        ax.plot(xs, ys, color="gray", ls="--", lw=1, label="chance")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"{st['k']}-NN label purity")
    ax.set_title(
        title_of(record, f"bottleneck features at t={res['t']} ({st['metric']})"), fontsize=9
    )
    ax.legend(fontsize=8)
    im = ax_m.imshow(res["overlap_matrix"], cmap="viridis", vmin=0.0, vmax=1.0)
    ax_m.set_xlabel("neighbour's class")
    ax_m.set_ylabel("sample's class (0 = most frequent)")
    ax_m.set_title("share of k-NN in each class", fontsize=9)
    fig.colorbar(im, ax=ax_m, fraction=0.046)
    return save_figure(fig, path)
