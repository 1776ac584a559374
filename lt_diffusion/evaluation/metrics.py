"""The metrics of an evaluation: FID, KID, Precision / Recall and IS from Inception features,
FD on DINOv2 features (through torch-fidelity's own metric functions, returning plain floats;
the feature space of KID, precision / recall and the diversity metrics is a protocol setting,
:func:`feature_spaces`), the diversity metrics
of :mod:`lt_diffusion.evaluation.diversity` (density, coverage, Vendi, LPIPS), and the **registry**
:data:`METRICS` that every consumer reads (the evaluator, record validation, table specs, the
printed table). A new metric is one :class:`Metric` entry plus its function (docs/extending.md).

Conventions: ``real`` first, ``fake`` (generated) second in every signature here (torch-fidelity's
PRC takes generated first; the swap is done inside). Statistics are float64. Sets too small for
a metric raise :class:`TooFewImagesError` saying what to change; FID from fewer images than
feature dimensions works but is rank-deficient and biased upwards, which is warned about and
noted in the record entry (:func:`compare`). A comparison with fewer images per side than FID's
feature dimension (:func:`small_sample`) reports KID ± std as its primary number and marks FID
as biased (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to
find them", CVPR: FID's bias grows as 1 / n).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

IS_SEED = 2020  # torch-fidelity's default shuffle seed for the IS splits


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


class KID(NamedTuple):
    """KID mean and std over subsets, and the subset size actually used."""

    mean: float
    std: float
    subset_size: int


def _need(n: int, minimum: int, what: str) -> None:
    if n < minimum:
        raise TooFewImagesError(
            f"{what} needs at least {minimum} images per set, got {n}: raise the number of "
            "generated / real images in the eval protocol, or leave this metric out"
        )


def _features(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf: the features are broken, not the metric")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def statistics(features: Any) -> Statistics:
    """``(mu, sigma, n)`` of ``features`` (N, D) in float64; needs N >= 2.

    Warns (:class:`SmallSampleWarning`) when N < D: sigma is then rank-deficient and FID is
    biased upwards; such numbers compare only with numbers from the same N.
    """
    x = _features(features, "features")
    _need(len(x), 2, "FID statistics")
    if len(x) < x.shape[1]:
        warnings.warn(
            f"FID statistics from {len(x)} images in {x.shape[1]} dimensions: the covariance is "
            "rank-deficient and FID is biased upwards; compare only numbers with equal n",
            SmallSampleWarning,
            stacklevel=2,
        )
    # Same estimator as torch-fidelity's fid_features_to_statistics (np.cov, N - 1), in float64.
    return Statistics(x.mean(axis=0), np.cov(x, rowvar=False), len(x))


def _as_stats(s: Any, name: str) -> dict[str, np.ndarray]:
    if isinstance(s, Mapping):
        mu, sigma = s["mu"], s["sigma"]
    else:
        mu, sigma = s[0], s[1]
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{name}: mu must be (D,) and sigma (D, D), got {mu.shape}, {sigma.shape}")
    return {"mu": mu, "sigma": sigma}


def fid(stats_a: Any, stats_b: Any) -> float:
    """Fréchet distance between two Gaussians ``(mu, sigma)`` (a :class:`Statistics`, a tuple or
    torch-fidelity's ``{"mu", "sigma"}`` dict), by torch-fidelity's ``fid_statistics_to_metric``.
    Symmetric; 0 for identical statistics up to rounding."""
    a, b = _as_stats(stats_a, "stats_a"), _as_stats(stats_b, "stats_b")
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"feature dimensions differ: {a['mu'].shape} vs {b['mu'].shape}")
    return float(fid_statistics_to_metric(a, b, verbose=False)["frechet_inception_distance"])


def kid(real: Any, fake: Any, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> KID:
    """Kernel Inception Distance: the unbiased MMD^2 estimator with the cubic polynomial kernel
    ``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets`` random subsets (without
    replacement, NumPy ``RandomState(seed)``), by torch-fidelity's ``kid_features_to_metric``.

    The subset size is capped at ``min(len(real), len(fake))`` (tail classes can be tiny); the
    size used is returned. Needs >= 2 images per set.
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    _same_dim(r, f)
    if subsets < 1:
        raise ValueError(f"kid subsets must be >= 1, got {subsets}")
    size = min(int(subset_size), len(r), len(f))
    _need(size, 2, "KID")
    out = kid_features_to_metric(
        torch.from_numpy(r),
        torch.from_numpy(f),
        kid_subsets=int(subsets),
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,  # 1 / d
        kid_kernel_poly_coef0=1,
        rng_seed=int(seed),
        verbose=False,
    )
    return KID(
        float(out["kernel_inception_distance_mean"]),
        float(out["kernel_inception_distance_std"]),
        size,
    )


def precision_recall(
    real: Any,
    fake: Any,
    k: int = 5,
    device: str | torch.device = "cpu",
    memory_budget: int = 2**26,
) -> tuple[float, float]:
    """Improved Precision and Recall (Kynkäänniemi et al. 2019) with neighbourhood ``k``, by
    torch-fidelity's ``prc_features_to_metric``: precision = share of generated samples inside
    some real sample's k-NN ball; recall = share of real samples inside some generated sample's
    k-NN ball. Distances in float64 (no TF32 rounding at the ball boundaries). Needs more than
    ``k`` images per set.

    ``device`` runs the distance matrices there (a GPU makes 50k x 50k fast); ``memory_budget``
    bounds the entries of one distance block (switching to torch-fidelity's blockwise path).
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    _same_dim(r, f)
    if k < 1:
        raise ValueError(f"precision/recall neighbourhood k must be >= 1, got {k}")
    _need(min(len(r), len(f)), k + 1, f"Precision/Recall with k={k}")
    n_max = max(len(r), len(f))
    full = n_max * n_max <= memory_budget
    batch = n_max if full else max(1, memory_budget // n_max)
    out = prc_features_to_metric(
        torch.from_numpy(f).to(device),  # torch-fidelity: features_1 is GENERATED
        torch.from_numpy(r).to(device),
        prc_neighborhood=int(k),
        prc_batch_size=int(batch),
        save_cpu_ram=not full,
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])


def inception_score(logits: Any, splits: int = 10, seed: int = IS_SEED) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` splits of the shuffled samples, from the
    unbiased logits (torch-fidelity's ``isc_features_to_metric``, seed 2020 as its default).
    ``splits`` is capped at the number of samples; needs >= 2 samples."""
    x = _features(logits, "logits")
    _need(len(x), 2, "IS")
    splits = max(1, min(int(splits), len(x)))
    out = isc_features_to_metric(torch.from_numpy(x), splits=splits, shuffle=True, rng_seed=seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


# ---------------------------------------------------------------------------- the registry


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
        return self.once("real_statistics", lambda: _quiet_statistics(self.real))


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


def _quiet_statistics(x: np.ndarray) -> Statistics:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # noted in the entry instead
        return statistics(x)


def _fd(c: Comparison, name: str) -> dict[str, Any]:
    """The Fréchet distance of the comparison's feature space (FID on Inception features)."""
    real = c.real_stats()
    value = fid(real, _quiet_statistics(c.fake))
    out = _finite({}, name, value)
    d = len(real.mu)
    n = min(len(c.fake), real.n if real.n is not None else len(c.fake))
    if n < d:
        out["notes"] = [
            f"{METRICS[name].label} from fewer images than feature dimensions ({n} < {d}): "
            "rank-deficient, biased upwards; compare only equal n"
        ]
    return out


def _kid(c: Comparison) -> dict[str, Any]:
    asked = int(c.settings["kid_subset_size"])
    k = kid(c.real, c.fake, asked, int(c.settings["kid_subsets"]), int(c.settings["seed"]))
    out = _finite({}, "kid", k.mean)
    out.update(
        kid_std=k.std, kid_subset_size=k.subset_size, kid_subsets=int(c.settings["kid_subsets"])
    )
    if k.subset_size < asked:
        out["notes"] = [f"KID subset size capped at {k.subset_size} (asked {asked})"]
    return out


def _prc(c: Comparison, which: str) -> dict[str, Any]:
    k = int(c.settings["pr_k"])
    p, r = c.once("prc", lambda: precision_recall(c.real, c.fake, k))
    return {which: p if which == "precision" else r, "pr_k": k}


def _is(c: Comparison) -> dict[str, Any]:
    if c.fake_logits is None:
        return {"is": None, "is_unavailable": c.is_unavailable or "no Inception logits"}
    splits = int(c.settings["is_splits"])
    mean, std = inception_score(c.fake_logits, splits)
    return {**_finite({}, "is", mean), "is_std": std, "is_splits": min(splits, len(c.fake))}


def _pr_minimum(settings: Mapping[str, Any]) -> int:
    return int(settings["pr_k"]) + 1  # k neighbours besides the sample itself


_IMAGE = {"features": "inception"}  # feature metrics: Inception unless the protocol says
_FIXED = {"features": "inception", "fixed_space": True}
register(Metric("fid", "FID", "lower", lambda c: _fd(c, "fid"), digits=2, **_FIXED,
                real="statistics"))  # fmt: skip
register(
    Metric("fd_dinov2", "FD_DINOv2", "lower", lambda c: _fd(c, "fd_dinov2"), digits=2,
           features="dinov2", fixed_space=True, real="statistics")
)  # fmt: skip
register(Metric("kid", "KID", "lower", _kid, requires=("kid_subset_size",), digits=4, **_IMAGE))
register(
    Metric(
        "precision", "precision", "higher", lambda c: _prc(c, "precision"), _pr_minimum, ("pr_k",),
        **_IMAGE,
    )
)  # fmt: skip
register(
    Metric(
        "recall", "recall", "higher", lambda c: _prc(c, "recall"), _pr_minimum, ("pr_k",),
        **_IMAGE,
    )
)  # fmt: skip
register(Metric("is", "IS", "higher", _is, **_FIXED, real="none"))


# Diversity (lt_diffusion/evaluation/diversity.py; docs/evaluation.md, "Diversity metrics").
def _dc(c: Comparison, which: str) -> dict[str, Any]:
    from lt_diffusion.evaluation.diversity import density_coverage

    k = int(c.settings["pr_k"])  # the same k-NN balls as precision / recall (Naeem et al.)
    density, coverage = c.once("dc", lambda: density_coverage(c.real, c.fake, k))
    return {which: density if which == "density" else coverage, "pr_k": k}


def _vendi(c: Comparison) -> dict[str, Any]:
    from lt_diffusion.evaluation.diversity import vendi_score

    # The real images' score beside it: what the same classes' real diversity is.
    return {**_finite({}, "vendi", vendi_score(c.fake)), "vendi_real": vendi_score(c.real)}


def _lpips(c: Comparison) -> dict[str, Any]:
    """Mean over the comparison's classes of each class's mean pairwise LPIPS, which the
    evaluator computes from the images (``extra``: ``lpips_per_class``, ``lpips_images``)."""
    if "lpips_per_class" not in c.extra:
        raise ValueError(
            "lpips_diversity needs the generated images of each class (Comparison.extra "
            "'lpips_per_class', supplied by the evaluator); features alone cannot give it"
        )
    used, asked = int(c.extra["lpips_images"]), int(c.settings["lpips_images"])
    out = _finite({}, "lpips_diversity", float(np.mean(c.extra["lpips_per_class"])))
    out["lpips_images"] = used
    if used < asked:
        out["notes"] = [f"LPIPS diversity from {used} images per class (asked {asked})"]
    return out


register(
    Metric(
        "density", "density", "higher", lambda c: _dc(c, "density"), _pr_minimum, ("pr_k",),
        **_IMAGE,
    )
)  # fmt: skip
register(
    Metric(
        "coverage", "coverage", "higher", lambda c: _dc(c, "coverage"), _pr_minimum, ("pr_k",),
        **_IMAGE,
    )
)  # fmt: skip
register(Metric("vendi", "Vendi", "higher", _vendi, digits=2, **_IMAGE))
register(
    Metric(
        "lpips_diversity", "LPIPS div.", "higher", _lpips, requires=("lpips_images",), real="none"
    )
)


def check_metrics(names: Sequence[str]) -> list[str]:
    """The names, refused with the registered ones listed when one is unknown."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} in eval.metrics: choose from {list(METRICS)}")
    return list(names)


def feature_spaces(names: Sequence[str], features: Mapping[str, Any] | None) -> dict[str, str]:
    """``{metric: feature space}`` of the metrics ``names`` that read image features: the
    protocol's ``eval.features`` entry, else the metric's own space. Refused: an unknown metric
    or space, a space for a metric that reads no features or whose name fixes its space (FID
    is Inception's; FD on DINOv2 is ``fd_dinov2``). Entries of registered metrics the protocol
    does not compute are ignored (overriding ``eval.metrics`` keeps the protocol's choices)."""
    from lt_diffusion.evaluation.extractors import check_space

    asked = {str(k): str(v) for k, v in (features or {}).items()}
    check_metrics(list(asked))
    out: dict[str, str] = {}
    for name in check_metrics(names):
        metric = METRICS[name]
        if metric.features is None:
            if name in asked:
                raise ValueError(f"eval.features.{name}: {name} reads no image features")
            continue
        space = check_space(asked.get(name, metric.features)).name
        if metric.fixed_space and space != metric.features:
            raise ValueError(
                f"eval.features.{name}={space}: {metric.label} is computed on {metric.features} "
                f"features by definition; add the metric of that space instead (e.g. fd_dinov2 "
                "for the Fréchet distance on DINOv2) or leave eval.features.{name} unset"
            )
        out[name] = space
    return out


def defining_features(names: Sequence[str], features: Mapping[str, Any] | None) -> dict[str, str]:
    """The entries of ``eval.features`` that change what ``names`` compute (a space other than
    the metric's own): what identifies the results (:mod:`lt_diffusion.utils.identity`)."""
    return {m: s for m, s in feature_spaces(names, features).items() if s != METRICS[m].features}


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


def _finite(out: dict[str, Any], name: str, value: float) -> dict[str, Any]:
    if math.isfinite(value):
        out[name] = value
    else:  # JSON cannot hold NaN / inf; say why there is no number instead
        out[name] = None
        out[f"{name}_unavailable"] = f"not finite ({value})"
    return out


def compare(comparison: Comparison, names: Sequence[str]) -> dict[str, Any]:
    """Every requested metric of one comparison, as a record entry: the counts, each metric's
    value and the settings it used, and the notes of all of them."""
    need = minimum_images(names, comparison.settings)
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
            _need(n, need, f"{'/'.join(names)} ({what})")
    out: dict[str, Any] = {"n_generated": len(comparison.fake), "n_real": n_real}
    notes: list[str] = []
    for name in names:
        values = METRICS[name].compute(comparison)
        notes += values.pop("notes", [])
        out.update(values)
    if notes:
        out["notes"] = notes
    return out


# The synthetic benchmark's exact metrics and the classifier's (accuracy, macro precision /
# recall) register themselves next to their functions; imported here so that every reader of
# the registry knows them.
from lt_diffusion.classification import metrics as _classification_metrics  # noqa: E402, F401
from lt_diffusion.evaluation import toy_metrics as _toy_metrics  # noqa: E402, F401
