"""IMBA distance per class at full noise (the IMBA loss paper, ICCV 2025; imba_loss_iccv2025.txt).

The paper derives that the discrepancy between the conditional and unconditional predictions of
a concept grows with its rarity, ``D_j ∝ 1 / phi(c_j)``, and, training with the true noise in
place of the conditional prediction, uses ``D = ||eps - eps_theta(x_t, null, t)||^gamma``
(stop-gradient) as a loss weight; it notes that ``D`` is comparable across concepts only at
``t = T`` (full noise). Here, per class, the mean over the class's training images (and
``draws`` fixed noise draws per image) of :func:`lt_diffusion.methods.imba.imba_distance`
between the true noise and the unconditional prediction at ``t = T - 1`` (``t: null``), with
the training method's ``gamma`` / ``granularity`` / ``power`` settings; a token-level distance
``(B, H, W)`` is averaged over its positions. Plotted against the class count: a proxy for
inverse frequency shows a falling curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lt_diffusion.analysis.common import (
    AnalysedRun,
    ClassSamples,
    check_sampling,
    check_timestep,
    deterministic_kernels,
    finite_or_none,
    model_dtype,
    progress,
    rank_correlation,
    split_means,
)
from lt_diffusion.diffusion import NoiseSchedule

NAME = "imba_distance"
GRANULARITIES = ("token", "sample")


@dataclass(frozen=True)
class ImbaDistanceSettings:
    """Settings of the IMBA-distance analysis (configs/analysis/imba_distance.yaml)."""

    t: int | None = None
    gamma: float = 0.8
    granularity: str = "token"
    power: str = "elementwise"
    images_per_class: int | None = None
    draws: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not float(self.gamma) > 0.0:
            raise ValueError(f"analysis.gamma must be > 0 (the paper uses 0.8), got {self.gamma!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"analysis.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        check_sampling(self.images_per_class, self.draws)


@torch.no_grad()
def imba_distance_per_class(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    gamma: float = 0.8,
    granularity: str = "token",
    power: str = "elementwise",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> list[float | None]:
    """Per class, the mean IMBA distance between the true noise and the unconditional
    prediction on its fixed draws (float64 accumulation; None for a class without images)."""
    from lt_diffusion.methods.imba import imba_distance

    dtype = model_dtype(model)
    out: list[float | None] = []
    for c in progress(range(samples.num_classes), "IMBA distance", show_progress):
        total, n = 0.0, 0
        for b in samples.batches(c, batch_size, device, dtype):
            x_t = schedule.q_sample(b.x0, b.t, b.noise)
            eps_uncond = model(x_t, b.t, None)  # y=None: the null label, the unconditional model
            d = imba_distance(
                b.noise, eps_uncond, gamma=gamma, granularity=granularity, power=power
            )
            per_sample = d.double().flatten(1).mean(1) if d.ndim > 1 else d.double()
            total += float(per_sample.sum())
            n += len(per_sample)
        out.append(finite_or_none(total / n) if n else None)
    return out


def compute(
    run: AnalysedRun, settings: ImbaDistanceSettings, batch_size: int, show_progress: bool
) -> dict[str, Any]:
    """Per-class distances at the chosen timestep, per-split means, rank correlation."""
    try:
        import lt_diffusion.methods.imba  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"the IMBA distance (lt_diffusion.methods.imba) cannot be imported ({err}): this "
            "installation lacks the IMBA method"
        ) from err
    t = check_timestep(settings.t, run.schedule.num_timesteps, "analysis.t")
    samples = run.samples(settings.images_per_class, settings.draws, settings.seed, t)
    with deterministic_kernels():
        dist = imba_distance_per_class(
            run.model, run.schedule, samples, settings.gamma, settings.granularity,
            settings.power, batch_size, run.device, show_progress,
        )  # fmt: skip
    return {
        "t": t,
        "distance": dist,
        "n_samples": [samples.count(c) for c in range(samples.num_classes)],
        "per_split": {"distance": split_means(dist, run.info["splits"])},
        "spearman_vs_count": rank_correlation(dist, run.info["class_counts"]),
    }


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Mean IMBA distance against the class's training count."""
    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    ds, res, st = record["dataset"], record["results"], record["settings"]
    fig, (ax,) = new_figure()
    scatter_vs_count(ax, res["distance"], ds["class_counts"], ds["splits"], ds.get("class_names"))
    ax.set_ylabel(rf"IMBA distance ($\gamma$={st['gamma']}, {st['granularity']})")
    rho = res.get("spearman_vs_count")
    extra = f", Spearman vs count {rho:.2f}" if rho is not None else ""
    ax.set_title(title_of(record, f"unconditional, t={res['t']}{extra}"), fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
