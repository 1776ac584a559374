"""FID, KID, Precision / Recall and IS from Inception features, through torch-fidelity's own
metric functions, returning plain floats.

Conventions: ``real`` first, ``fake`` (generated) second in every signature here (torch-fidelity's
PRC takes generated first; the swap is done inside). Statistics are float64. Sets too small for
a metric raise :class:`TooFewImagesError` saying what to change; FID from fewer images than
feature dimensions works but is rank-deficient and biased upwards, which is warned about and
noted in :func:`compare_features`' output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

METRICS = ("fid", "kid", "precision", "recall", "is")
IS_SEED = 2020  # torch-fidelity's default shuffle seed for the IS splits


class TooFewImagesError(ValueError):
    """A metric was asked of fewer images than it needs."""


class SmallSampleWarning(UserWarning):
    """FID statistics from fewer images than feature dimensions (rank-deficient covariance)."""


class Statistics(NamedTuple):
    """Mean and covariance (float64) of a feature set, and how many images made them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


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


def minimum_images(metrics: Sequence[str], pr_k: int) -> int:
    """Fewest images per set the given metrics accept (for checks before long work)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {list(METRICS)}")
    need = 2
    if "precision" in metrics or "recall" in metrics:
        need = max(need, int(pr_k) + 1)
    return need


def _finite_or_none(out: dict[str, Any], name: str, value: float) -> None:
    if math.isfinite(value):
        out[name] = value
    else:  # JSON cannot hold NaN / inf; say why there is no number instead
        out[name] = None
        out[f"{name}_unavailable"] = f"not finite ({value})"


def compare_features(
    real: Any,
    fake: Any,
    metrics: Sequence[str] = ("fid", "kid", "precision", "recall"),
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    pr_k: int = 5,
    seed: int = 0,
    real_stats: Statistics | None = None,
    fake_logits: Any = None,
    is_splits: int = 10,
    is_unavailable: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Every requested metric of one comparison, as a record entry (see ``record.py``).

    ``real_stats`` (e.g. from the reference cache) saves recomputing the real covariance. IS
    is computed from ``fake_logits``; when they are None, ``is`` is None and ``is_unavailable``
    carries the reason (pass the extractor info's ``is_unavailable``). The entry holds the counts
    and settings each number depends on: ``n_generated``, ``n_real``, ``kid_subset_size``,
    ``kid_subsets``, ``pr_k``, ``is_splits``, and ``notes``.
    """
    minimum_images(metrics, pr_k)
    r, f = _features(real, "real"), _features(fake, "fake")
    _same_dim(r, f)
    out: dict[str, Any] = {"n_generated": len(f), "n_real": len(r)}
    notes: list[str] = []
    if "fid" in metrics:
        if real_stats is not None and real_stats.n != len(r):
            raise ValueError(f"real_stats are of {real_stats.n} images, real has {len(r)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)  # noted below instead
            s_real = real_stats if real_stats is not None else statistics(r)
            s_fake = statistics(f)
        _finite_or_none(out, "fid", fid(s_real, s_fake))
        if min(len(r), len(f)) < r.shape[1]:
            notes.append(
                f"FID from fewer images than feature dimensions ({min(len(r), len(f))} < "
                f"{r.shape[1]}): rank-deficient, biased upwards; compare only equal n"
            )
    if "kid" in metrics:
        k = kid(r, f, kid_subset_size, kid_subsets, seed)
        _finite_or_none(out, "kid", k.mean)
        out.update(kid_std=k.std, kid_subset_size=k.subset_size, kid_subsets=int(kid_subsets))
        if k.subset_size < kid_subset_size:
            notes.append(f"KID subset size capped at {k.subset_size} (asked {kid_subset_size})")
    if "precision" in metrics or "recall" in metrics:
        p, rc = precision_recall(r, f, pr_k, device=device)
        if "precision" in metrics:
            out["precision"] = p
        if "recall" in metrics:
            out["recall"] = rc
        out["pr_k"] = int(pr_k)
    if "is" in metrics:
        if fake_logits is None:
            out["is"] = None
            out["is_unavailable"] = is_unavailable or "no logits were given for the IS"
        else:
            logits = _features(fake_logits, "fake_logits")
            if len(logits) != len(f):
                raise ValueError(f"{len(logits)} logits for {len(f)} generated feature rows")
            mean, std = inception_score(logits, is_splits)
            _finite_or_none(out, "is", mean)
            out.update(is_std=std, is_splits=min(int(is_splits), len(logits)))
    if notes:
        out["notes"] = notes
    return out
