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

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from lt_diffusion.evaluation.diversity import density_coverage, vendi_score
from lt_diffusion.records.metrics import (  # the registry: its names were defined here
    METRICS as METRICS,
)
from lt_diffusion.records.metrics import (
    Comparison as Comparison,
)
from lt_diffusion.records.metrics import (
    Metric as Metric,
)
from lt_diffusion.records.metrics import (
    SmallSampleWarning as SmallSampleWarning,
)
from lt_diffusion.records.metrics import (
    Statistics as Statistics,
)
from lt_diffusion.records.metrics import (
    TooFewImagesError as TooFewImagesError,
)
from lt_diffusion.records.metrics import (
    check_metrics as check_metrics,
)
from lt_diffusion.records.metrics import (
    compare as compare,
)
from lt_diffusion.records.metrics import (
    feature_matrix as feature_matrix,
)
from lt_diffusion.records.metrics import (
    finite as finite,
)
from lt_diffusion.records.metrics import (
    minimum_images as minimum_images,
)
from lt_diffusion.records.metrics import (
    need as need,
)
from lt_diffusion.records.metrics import (
    quiet_statistics as quiet_statistics,
)
from lt_diffusion.records.metrics import (
    register as register,
)
from lt_diffusion.records.metrics import (
    same_dim as same_dim,
)
from lt_diffusion.records.metrics import (
    small_sample as small_sample,
)
from lt_diffusion.records.metrics import (
    statistics as statistics,
)

IS_SEED = 2020  # torch-fidelity's default shuffle seed for the IS splits


class KID(NamedTuple):
    """KID mean and std over subsets, and the subset size actually used."""

    mean: float
    std: float
    subset_size: int


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
    r, f = feature_matrix(real, "real"), feature_matrix(fake, "fake")
    same_dim(r, f)
    if subsets < 1:
        raise ValueError(f"kid subsets must be >= 1, got {subsets}")
    size = min(int(subset_size), len(r), len(f))
    need(size, 2, "KID")
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
    r, f = feature_matrix(real, "real"), feature_matrix(fake, "fake")
    same_dim(r, f)
    if k < 1:
        raise ValueError(f"precision/recall neighbourhood k must be >= 1, got {k}")
    need(min(len(r), len(f)), k + 1, f"Precision/Recall with k={k}")
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
    x = feature_matrix(logits, "logits")
    need(len(x), 2, "IS")
    splits = max(1, min(int(splits), len(x)))
    out = isc_features_to_metric(torch.from_numpy(x), splits=splits, shuffle=True, rng_seed=seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


def _fd(c: Comparison, name: str) -> dict[str, Any]:
    """The Fréchet distance of the comparison's feature space (FID on Inception features)."""
    real = c.real_stats()
    value = fid(real, quiet_statistics(c.fake))
    out = finite({}, name, value)
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
    out = finite({}, "kid", k.mean)
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
    return {**finite({}, "is", mean), "is_std": std, "is_splits": min(splits, len(c.fake))}


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
register(Metric("is", "IS", "higher", _is, **_FIXED, real="none"))


# Diversity (lt_diffusion/evaluation/diversity.py; docs/evaluation.md, "Diversity metrics").
def _dc(c: Comparison, which: str) -> dict[str, Any]:
    k = int(c.settings["pr_k"])  # the same k-NN balls as precision / recall (Naeem et al.)
    density, coverage = c.once("dc", lambda: density_coverage(c.real, c.fake, k))
    return {which: density if which == "density" else coverage, "pr_k": k}


def _vendi(c: Comparison) -> dict[str, Any]:
    # The real images' score beside it: what the same classes' real diversity is.
    return {**finite({}, "vendi", vendi_score(c.fake)), "vendi_real": vendi_score(c.real)}


def _lpips(c: Comparison) -> dict[str, Any]:
    """Mean over the comparison's classes of each class's mean pairwise LPIPS, which the
    evaluator computes from the images (``extra``: ``lpips_per_class``, ``lpips_images``)."""
    if "lpips_per_class" not in c.extra:
        raise ValueError(
            "lpips_diversity needs the generated images of each class (Comparison.extra "
            "'lpips_per_class', supplied by the evaluator); features alone cannot give it"
        )
    used, asked = int(c.extra["lpips_images"]), int(c.settings["lpips_images"])
    out = finite({}, "lpips_diversity", float(np.mean(c.extra["lpips_per_class"])))
    out["lpips_images"] = used
    if used < asked:
        out["notes"] = [f"LPIPS diversity from {used} images per class (asked {asked})"]
    return out


# The k-NN metrics: precision / recall (one pass) and density / coverage (Naeem et al.), on
# the same k-NN balls of the real features.
for _name, _fn in (("precision", _prc), ("recall", _prc), ("density", _dc), ("coverage", _dc)):
    register(
        Metric(_name, _name, "higher", functools.partial(_fn, which=_name), _pr_minimum,
               ("pr_k",), **_IMAGE)
    )  # fmt: skip
register(Metric("vendi", "Vendi", "higher", _vendi, digits=2, **_IMAGE))
register(
    Metric(
        "lpips_diversity", "LPIPS div.", "higher", _lpips, requires=("lpips_images",), real="none"
    )
)


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


# The synthetic benchmark's exact metrics register themselves beside their functions.
from lt_diffusion.evaluation import toy_metrics as _toy_metrics  # noqa: E402, F401
