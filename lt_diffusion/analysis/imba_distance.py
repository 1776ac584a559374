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

The check of the claim itself (``vs_frequency``): the distances against ``1 / frequency``,
Spearman's rank correlation (with its p-value) and the slope of ``log D`` on ``log(1 / f)`` by
least squares (with its 95 % t-interval): ``D ∝ 1 / f`` is a slope of 1 (of ``gamma`` with the
elementwise power: use ``gamma: 1`` for the paper's distance). Its unit is the class, or, for a
model whose tokens show one concept each (the concept-pair model of the synthetic composition
data), the **concept**: per concept the mean token distance over the tokens that show it,
against the number of training samples showing it (both vocabularies pooled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from lt_diffusion.utils.threads import torch_threads

NAME = "imba_distance"
GRANULARITIES = ("token", "sample")
UNIFORM = "uniform"  # analysis.t: each draw's t uniform, as training draws it


@dataclass(frozen=True)
class ImbaDistanceSettings:
    """Settings of the IMBA-distance analysis (configs/analysis/imba_distance.yaml)."""

    t: int | str | None = None  # a timestep, null (T - 1) or "uniform" (t ~ U{0..T-1} per draw)
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
        t = self.t
        if not (t is None or t == UNIFORM or (isinstance(t, int) and not isinstance(t, bool))):
            raise ValueError(
                f"analysis.t must be a timestep, null (T - 1) or {UNIFORM!r}, got {t!r}"
            )


@torch.no_grad()
def mean_imba_distances(
    model: nn.Module,
    schedule: NoiseSchedule,
    samples: ClassSamples,
    unit: str = "class",
    gamma: float = 0.8,
    granularity: str = "token",
    power: str = "elementwise",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> list[float | None]:
    """The mean IMBA distance between the true noise and the unconditional prediction on the
    fixed draws, per ``unit`` (float64 accumulation; None for a unit without a sample):
    ``"class"``, over each class's draws (a sample's distance the mean over its coordinates);
    ``"concept"``, for a model whose tokens each show one concept (``model.token_concepts``),
    the token-level distance over the tokens that show the concept (``granularity`` is then
    token)."""
    from lt_diffusion.methods.imba import imba_distance, model_tokens

    if unit not in ("class", "concept"):
        raise ValueError(f"unit must be 'class' or 'concept', got {unit!r}")
    per_class = unit == "class"
    dtype, tokens = model_dtype(model), model_tokens(model)
    size = samples.num_classes if per_class else sum(model.vocab_sizes)
    total = torch.zeros(size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for c in progress(range(samples.num_classes), "IMBA distance", show_progress):
        for b in samples.batches(c, batch_size, device, dtype):
            x_t = schedule.q_sample(b.x0, b.t, b.noise)
            eps_uncond = model(x_t, b.t, None)  # y=None: the null label, the unconditional model
            d = imba_distance(b.noise, eps_uncond, gamma=gamma, power=power, tokens=tokens,
                              granularity=granularity if per_class else "token").double()  # fmt: skip
            if per_class:  # a sample's distance: the mean over its coordinates
                d = d.flatten(1).mean(1) if d.ndim > 1 else d
                units = torch.full((len(d),), c)
            else:
                units = model.token_concepts(b.y)
            units, d = units.cpu().flatten(), d.cpu().flatten()
            total.index_add_(0, units, d)
            count.index_add_(0, units, torch.ones_like(d))
    return [finite_or_none(float(t / n)) if n else None for t, n in zip(total, count)]


def frequency_fit(
    values: list[float | None], counts: list[float], names: list[str], unit: str
) -> dict[str, Any]:
    """The distances against inverse frequency: Spearman's rho of ``D`` and ``1 / f`` with its
    p-value, and the least-squares slope of ``log D`` on ``log(1 / f)`` with its 95 %
    t-interval ``[slope_low, slope_high]`` (``n - 2`` degrees of freedom), over the units with a positive distance and
    count; None where fewer than three such units or a constant side leave them undefined."""
    from scipy import stats

    keep = [(v, float(n)) for v, n in zip(values, counts) if v is not None and v > 0 and n > 0]
    out: dict[str, Any] = {
        "unit": unit, "names": names, "distance": values, "count": [float(n) for n in counts],
        "n": len(keep), "spearman": None, "spearman_p": None, "loglog_slope": None,
        "slope_low": None, "slope_high": None,
    }  # fmt: skip
    if len(keep) < 3 or len({n for _, n in keep}) < 2 or len({v for v, _ in keep}) < 2:
        return out
    d = np.array([v for v, _ in keep])
    inv = 1.0 / np.array([n for _, n in keep])
    rho = stats.spearmanr(d, inv)
    fit = stats.linregress(np.log(inv), np.log(d))
    half = float(stats.t.ppf(0.975, len(keep) - 2) * fit.stderr)
    out.update(
        spearman=finite_or_none(rho.statistic), spearman_p=finite_or_none(rho.pvalue),
        loglog_slope=finite_or_none(fit.slope),
        slope_low=finite_or_none(fit.slope - half), slope_high=finite_or_none(fit.slope + half),
    )  # fmt: skip
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
    uniform = settings.t == UNIFORM
    t = None if uniform else check_timestep(settings.t, run.schedule.num_timesteps, "analysis.t")
    samples = run.samples(settings.images_per_class, settings.draws, settings.seed, t)
    # The run's own CPU threads (a tiny model runs faster on one; utils/threads.py).
    threads = torch_threads(run.train_cfg.train.get("threads"), "train.threads")
    with deterministic_kernels(), threads:
        common = dict(gamma=settings.gamma, power=settings.power, batch_size=batch_size,
                      device=run.device)  # fmt: skip
        model = run.model
        dist = mean_imba_distances(
            model, run.schedule, samples, "class", granularity=settings.granularity,
            show_progress=show_progress, **common,
        )  # fmt: skip
        if hasattr(model, "token_concepts"):  # one concept per token: the concepts are the unit
            per_concept = mean_imba_distances(model, run.schedule, samples, "concept", **common)
            names = [f"{v}{k}" for v, size in zip("ab", model.vocab_sizes) for k in range(size)]
            counts = model.concept_counts(run.info["class_counts"]).tolist()
            vs_frequency = frequency_fit(per_concept, counts, names, "concept")
        else:
            names = [str(n) for n in run.info["class_names"]]
            vs_frequency = frequency_fit(dist, run.info["class_counts"], names, "class")
    return {
        "t": UNIFORM if uniform else t,
        "distance": dist,
        "n_samples": [samples.count(c) for c in range(samples.num_classes)],
        "per_split": {"distance": split_means(dist, run.info["splits"])},
        "spearman_vs_count": rank_correlation(dist, run.info["class_counts"]),
        "vs_frequency": vs_frequency,
    }


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Two panels: the mean IMBA distance per class against the class's training count, and
    the distance per unit (class or concept) against the inverse frequency, log-log, with the
    least-squares line."""
    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    ds, res, st = record["dataset"], record["results"], record["settings"]
    fig, (ax, ax2) = new_figure(2)
    scatter_vs_count(ax, res["distance"], ds["class_counts"], ds["splits"], ds.get("class_names"))
    ax.set_ylabel(rf"IMBA distance ($\gamma$={st['gamma']}, {st['granularity']})")
    rho = res.get("spearman_vs_count")
    extra = f", Spearman vs count {rho:.2f}" if rho is not None else ""
    ax.set_title(title_of(record, f"unconditional, t={res['t']}{extra}"), fontsize=9)
    ax.legend(fontsize=8)
    fit = res.get("vs_frequency") or {}
    pts = [(n, d, name) for n, d, name in zip(fit.get("count", []), fit.get("distance", []),
                                              fit.get("names", [])) if d and n]  # fmt: skip
    if pts:
        total = sum(n for n, _, _ in pts)
        inv = np.array([total / n for n, _, _ in pts])  # 1 / frequency
        dist = np.array([d for _, d, _ in pts])
        ax2.loglog(inv, dist, "o", color="tab:purple")
        for x, y, (_, _, name) in zip(inv, dist, pts):
            ax2.annotate(name, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        if fit.get("loglog_slope") is not None:
            slope = fit["loglog_slope"]
            xs = np.geomspace(inv.min(), inv.max(), 20)
            centre = np.exp(np.mean(np.log(dist)) + slope * (np.log(xs) - np.mean(np.log(inv))))
            lo, hi = fit["slope_low"], fit["slope_high"]
            ax2.plot(xs, centre, "-", color="gray",
                     label=f"slope {slope:.2f} [{lo:.2f}, {hi:.2f}]")  # fmt: skip
            ax2.legend(fontsize=8)
        rho2 = fit.get("spearman")
        ax2.set_title(f"per {fit['unit']}: Spearman(D, 1/f) "
                      + (f"{rho2:.2f} (p={fit['spearman_p']:.2g})" if rho2 is not None else "n/a"),
                      fontsize=9)  # fmt: skip
    ax2.set_xlabel("1 / frequency (total / count)")
    ax2.set_ylabel("IMBA distance")
    return save_figure(fig, path)
