"""The metric registry: what a metric is (:class:`Metric`), the metrics known (:data:`METRICS`),
one comparison's inputs (:class:`Comparison`) and computing a record entry from them
(:func:`compare`), with the feature checks every metric uses. Each metric registers itself
beside its function: the image metrics (:mod:`lt_diffusion.evaluation.metrics`), the synthetic
benchmark's exact ones (:mod:`lt_diffusion.evaluation.toy_metrics`), the classifier's
(:mod:`lt_diffusion.classification.metrics`); records and tables read them here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch


class TooFewImagesError(ValueError):
    """A metric was asked of fewer images than it needs."""


class SmallSampleWarning(UserWarning):
    """FID statistics from fewer images than feature dimensions (rank-deficient covariance)."""


class Statistics(NamedTuple):
    """Mean and covariance (float64) of a feature set, and how many images made them (None: a
    statistics file that does not say)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None


def need(n: int, minimum: int, what: str) -> None:
    """Refuse fewer than ``minimum`` images for ``what``, saying how to get more."""
    if n < minimum:
        raise TooFewImagesError(
            f"{what} needs at least {minimum} images per set, got {n}: raise the number of "
            "generated / real images in the eval protocol, or leave this metric out"
        )


def feature_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float64 (N, D) matrix, refused naming ``name`` otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf: the features are broken, not the metric")
    return x


def same_dim(a: np.ndarray, b: np.ndarray) -> None:
    """Refuse two feature sets of different dimensions."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def statistics(features: Any) -> Statistics:
    """``(mu, sigma, n)`` of ``features`` (N, D) in float64; needs N >= 2.

    Warns (:class:`SmallSampleWarning`) when N < D: sigma is then rank-deficient and FID is
    biased upwards; such numbers compare only with numbers from the same N.
    """
    x = feature_matrix(features, "features")
    need(len(x), 2, "FID statistics")
    if len(x) < x.shape[1]:
        warnings.warn(
            f"FID statistics from {len(x)} images in {x.shape[1]} dimensions: the covariance is "
            "rank-deficient and FID is biased upwards; compare only numbers with equal n",
            SmallSampleWarning,
            stacklevel=2,
        )
    # Same estimator as torch-fidelity's fid_features_to_statistics (np.cov, N - 1), in float64.
    return Statistics(x.mean(axis=0), np.cov(x, rowvar=False), len(x))


@dataclass
class Comparison:
    """One comparison's inputs, shared by every metric computed on it (statistics and the
    precision / recall pass are computed once). ``settings``: the protocol (``pr_k``,
    ``kid_subset_size``, ``kid_subsets``, ``is_splits``, ``seed``); ``extra``: anything a
    metric of another kind of data needs (e.g. a toy dataset's true densities)."""

    real: np.ndarray
    fake: np.ndarray
    settings: Mapping[str, Any]
    fake_logits: np.ndarray | None = None
    is_unavailable: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The real set's mean and covariance from a statistics file (eval.reference) instead of
    # ``real`` (then empty): only metrics with ``real="statistics"`` can be computed.
    real_statistics: Statistics | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def once(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def n_real(self) -> int | None:
        """Real images compared (None: a statistics file that does not say)."""
        if self.real_statistics is not None:
            return self.real_statistics.n
        return len(self.real)

    def real_stats(self) -> Statistics:
        """The real set's statistics: the file's, or computed once from ``real``."""
        if self.real_statistics is not None:
            return self.real_statistics
        return self.once("real_statistics", lambda: quiet_statistics(self.real))


@dataclass(frozen=True)
class Metric:
    """One metric: how it is computed and how it is read.

    ``compute(comparison) -> {name: value, settings it used...}`` (a value None must come with
    ``<name>_unavailable``: why); ``min_images(settings)``: the fewest images per set it
    accepts (checked before any generation); ``requires``: entry keys that must accompany a
    value (the settings a number depends on); ``better``: ``lower`` or ``higher`` (tables mark
    the best); ``label`` / ``digits``: how tables and the terminal show it. ``features``: the
    feature space it is computed in (:mod:`lt_diffusion.evaluation.extractors`; None: it reads
    no image features), settable per protocol (``eval.features``) unless ``fixed_space`` (its
    name states the space: FID, IS, FD_DINOv2). ``real``: what it needs of the real images:
    their ``features``, only their ``statistics`` (mean and covariance: a statistics file can
    stand in), or ``none``.
    """

    name: str
    label: str
    better: str
    compute: Callable[[Comparison], dict[str, Any]]
    min_images: Callable[[Mapping[str, Any]], int] = lambda settings: 2
    requires: tuple[str, ...] = ()
    digits: int = 3
    features: str | None = None
    fixed_space: bool = False
    real: str = "features"


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    if metric.better not in ("lower", "higher"):
        raise ValueError(f"metric {metric.name}: better must be 'lower' or 'higher'")
    METRICS[metric.name] = metric
    return metric


def quiet_statistics(x: np.ndarray) -> Statistics:
    """:func:`statistics` without the small-sample warning (the entry notes it instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # noted in the entry instead
        return statistics(x)


def check_metrics(names: Sequence[str]) -> list[str]:
    """The names, refused with the registered ones listed when one is unknown."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} in eval.metrics: choose from {list(METRICS)}")
    return list(names)


# Below this many images on either side a comparison is "small": the covariance of the
# features is rank-deficient and FID is biased upwards (it shrinks as 1 / n; Chong & Forsyth
# 2020). Its primary number is then KID ± std (unbiased at any n; the std over subsets says
# how noisy it is). The dimension of the space FID is computed in: 2048 for Inception.
def small_sample(n_real: int | None, n_generated: int, dim: int) -> bool:
    """Whether a comparison of ``n_real`` (None: unknown) and ``n_generated`` images in a
    ``dim``-dimensional feature space is small (docs/evaluation.md, Small samples)."""
    return min(n_generated, n_generated if n_real is None else n_real) < dim


def minimum_images(names: Sequence[str], settings: Mapping[str, Any]) -> int:
    """Fewest images per set the given metrics accept (for checks before long work)."""
    return max([2, *(METRICS[m].min_images(settings) for m in check_metrics(names))])


def finite(out: dict[str, Any], name: str, value: float) -> dict[str, Any]:
    """``out[name] = value``, or None with ``<name>_unavailable`` when it is not finite."""
    if math.isfinite(value):
        out[name] = value
    else:  # JSON cannot hold NaN / inf; say why there is no number instead
        out[name] = None
        out[f"{name}_unavailable"] = f"not finite ({value})"
    return out


def compare(comparison: Comparison, names: Sequence[str]) -> dict[str, Any]:
    """Every requested metric of one comparison, as a record entry: the counts, each metric's
    value and the settings it used, and the notes of all of them."""
    fewest = minimum_images(names, comparison.settings)
    if comparison.real_statistics is not None:
        needs_real = [m for m in names if METRICS[m].real == "features"]
        if needs_real:
            raise ValueError(
                f"{needs_real} need the real images' features; a statistics file holds only "
                "their mean and covariance"
            )
    n_real = comparison.n_real
    for what, n in (("real", n_real), ("generated", len(comparison.fake))):
        if n is not None:
            need(n, fewest, f"{'/'.join(names)} ({what})")
    out: dict[str, Any] = {"n_generated": len(comparison.fake), "n_real": n_real}
    notes: list[str] = []
    for name in names:
        values = METRICS[name].compute(comparison)
        notes += values.pop("notes", [])
        out.update(values)
    if notes:
        out["notes"] = notes
    return out
