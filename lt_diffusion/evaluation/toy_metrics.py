"""Exact metrics of the synthetic benchmark: generated points of one class against the class's
known density (:class:`~lt_diffusion.data.toy.GaussianMixtureClasses`) or fresh draws of it.

Each metric is one function ``(real or truth, generated, ...) -> float`` on float arrays
``(N, D)``, computed in float64:

* :func:`sliced_wasserstein`: the sliced 1-Wasserstein distance (Rabin et al. 2011; Bonneel et
  al. 2015) over fixed seeded directions, each 1-D distance exact between the two empirical
  distributions (``int |F - G|``). Lower is better; about ``1 / sqrt(N)`` between two samples
  of the same law.
* :func:`mmd`: the unbiased estimate of the squared maximum mean discrepancy with a Gaussian
  kernel of fixed bandwidth (Gretton et al. 2012, Lemma 6). Lower is better; its expectation is
  0 when the two laws are equal, so it can be slightly negative.
* :func:`mode_precision`: the share of the class's points that hit one of *its* modes.
* :func:`borrowing`: the share that hit a mode of *another* class (a tail class generating a
  head class's points). ``1 - precision - borrowing`` lands on no mode at all.
* :func:`mode_coverage`: how much of the class's mass is generated in the right amount,
  ``sum_k min(n_k / N, q w_k) / q`` over the class's modes ``k`` (``n_k`` points hit mode
  ``k``, ``w_k`` its weight, ``q`` the probability that a true draw hits its mode): 1 when every
  mode gets its share, ``w_k`` lost for a dropped mode, and at most the precision. A finite
  sample of the true law scores slightly below 1 (``E min(X, mu) < mu``).
* :func:`unobserved_recall` (the transfer variant): the same sum over only the sub-modes the
  class's training draw never showed, ``sum_{k hidden} min(n_k / N, q w_k) / (q sum_{k hidden}
  w_k)``: 1 when the generator puts their full share on them (what sharing structure with the
  other classes could give), 0 when it never goes there. Undefined for a class with no hidden
  sub-mode.
* :func:`memorization`: the share of generated points within ``radius`` of a training point
  (any class's), i.e. copies of training data. A fresh true draw lands that close by chance
  too, the more so the denser the training points: read it against the sampling floor.

A point *hits* a mode when it lies in the mode's chi-square ball
(:meth:`~lt_diffusion.data.toy.GaussianMixtureClasses.hit_mode`); the balls are disjoint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lt_diffusion.data.toy import GaussianMixtureClasses
from lt_diffusion.records.metrics import Comparison, Metric, register


def _points(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name} must be a non-empty {want} array of points, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def projection_directions(dim: int, num_projections: int, seed: int = 0) -> np.ndarray:
    """``num_projections`` fixed unit directions in R^dim, ``(L, dim)``, uniform on the sphere
    (normalised Gaussian draws of ``default_rng(seed)``)."""
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    g = np.random.default_rng(seed).standard_normal((int(num_projections), int(dim)))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def wasserstein_1d(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact 1-Wasserstein distances between rows of ``u`` (L, n) and ``v`` (L, m), each row an
    empirical distribution: ``int |F_u - F_v| dx``, from one sort of the merged values (the
    step ``F_u - F_v`` changes by ``+1/n`` at a ``u`` value and ``-1/m`` at a ``v`` value)."""
    n, m = u.shape[1], v.shape[1]
    values = np.concatenate([u, v], axis=1)
    steps = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    cdf_gap = np.cumsum(steps[order], axis=1)[:, :-1]
    return (np.abs(cdf_gap) * np.diff(sorted_values, axis=1)).sum(axis=1)


def sliced_wasserstein(
    real: np.ndarray, generated: np.ndarray, num_projections: int = 128, seed: int = 0
) -> float:
    """``mean_l W_1(theta_l . real, theta_l . generated)`` over
    :func:`projection_directions` (fixed by ``seed``)."""
    real = _points(real, "real")
    generated = _points(generated, "generated", real.shape[1])
    theta = projection_directions(real.shape[1], num_projections, seed)
    return float(wasserstein_1d(theta @ real.T, theta @ generated.T).mean())


def mmd(real: np.ndarray, generated: np.ndarray, bandwidth: float) -> float:
    """Unbiased ``MMD^2_u`` with ``k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))``:
    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``
    (Gretton et al. 2012, Lemma 6). Needs at least two points on each side."""
    x = _points(real, "real")
    y = _points(generated, "generated", x.shape[1])
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD needs at least 2 points on each side, got {len(x)} and {len(y)}")
    if not bandwidth > 0:
        raise ValueError(f"the MMD kernel bandwidth must be > 0, got {bandwidth}")

    def kernel_sum(a: np.ndarray, b: np.ndarray) -> float:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return float(np.exp(-np.maximum(d2, 0.0) / (2.0 * bandwidth**2)).sum())

    m, n = len(x), len(y)
    # k(a, a) = 1 on the diagonals, which the unbiased estimate leaves out.
    xx = (kernel_sum(x, x) - m) / (m * (m - 1))
    yy = (kernel_sum(y, y) - n) / (n * (n - 1))
    return xx + yy - 2.0 * kernel_sum(x, y) / (m * n)


def _hits(truth: GaussianMixtureClasses, generated: np.ndarray, label: int) -> np.ndarray:
    """The class of the mode each point hits (-1: none)."""
    if not 0 <= int(label) < truth.num_classes:
        raise ValueError(f"class {label} is not one of the {truth.num_classes} classes")
    mode = truth.hit_mode(_points(generated, "generated", truth.dim))
    return np.where(mode >= 0, truth.mode_class[np.maximum(mode, 0)], -1)


def mode_precision(truth: GaussianMixtureClasses, generated: np.ndarray, label: int) -> float:
    """Share of ``generated`` (points of class ``label``) that hit one of its own modes."""
    return float((_hits(truth, generated, label) == int(label)).mean())


def borrowing(truth: GaussianMixtureClasses, generated: np.ndarray, label: int) -> float:
    """Share of ``generated`` (points of class ``label``) that hit another class's mode."""
    hit = _hits(truth, generated, label)
    return float(((hit >= 0) & (hit != int(label))).mean())


def mode_coverage(truth: GaussianMixtureClasses, generated: np.ndarray, label: int) -> float:
    """``sum_k min(n_k / N, q w_k) / q`` over the modes ``k`` of class ``label``."""
    x = _points(generated, "generated", truth.dim)
    if not 0 <= int(label) < truth.num_classes:
        raise ValueError(f"class {label} is not one of the {truth.num_classes} classes")
    mode = truth.hit_mode(x)
    first = int(label) * truth.modes_per_class  # the class's modes are contiguous
    counts = np.bincount(mode[mode >= 0], minlength=truth.mode_means.shape[0])
    share = counts[first : first + truth.modes_per_class] / len(x)
    q = truth.hit_quantile
    return float(np.minimum(share, q * truth.weights[int(label)]).sum() / q)


def unobserved_recall(
    truth: GaussianMixtureClasses, generated: np.ndarray, label: int, training_modes: np.ndarray
) -> float | None:
    """``sum_{k hidden} min(n_k / N, q w_k) / (q sum_{k hidden} w_k)`` over the sub-modes of
    class ``label`` that ``training_modes`` (C, K) bool marks as unseen in training; None when
    it has none."""
    x = _points(generated, "generated", truth.dim)
    if not 0 <= int(label) < truth.num_classes:
        raise ValueError(f"class {label} is not one of the {truth.num_classes} classes")
    hidden = ~np.asarray(training_modes, dtype=bool)[int(label)]
    if not hidden.any():
        return None
    mode = truth.hit_mode(x)
    first = int(label) * truth.modes_per_class
    counts = np.bincount(mode[mode >= 0], minlength=truth.mode_means.shape[0])
    share = counts[first : first + truth.modes_per_class] / len(x)
    q, w = truth.hit_quantile, truth.weights[int(label)]
    return float(np.minimum(share, q * w)[hidden].sum() / (q * w[hidden].sum()))


def memorization(generated: np.ndarray, train_points: np.ndarray, radius: float) -> float:
    """Share of ``generated`` points with a point of ``train_points`` within ``radius``."""
    from scipy.spatial import cKDTree

    x = _points(generated, "generated")
    train = _points(train_points, "train_points", x.shape[1])
    if not radius > 0:
        raise ValueError(f"the memorisation radius must be > 0, got {radius}")
    dist, _ = cKDTree(train).query(x, k=1, distance_upper_bound=float(radius))
    return float((dist <= radius).mean())


def _maybe(name: str, value: float | None, why: str) -> dict[str, object]:
    if value is None:
        return {name: None, f"{name}_unavailable": why}
    return {name: float(value)}


# The registry entries (lt_diffusion/evaluation/metrics.py), so that records, tables and the
# terminal read them like the image metrics. A comparison's ``real`` are fresh true draws of
# the class, ``fake`` its generated points; ``extra`` holds the mixture (``truth``), the class
# (``label``) and the MMD bandwidth.
def _toy(
    name: str, label: str, better: str, fn: Callable[[Comparison], float], digits: int = 3
) -> str:
    register(Metric(name, label, better, lambda c: {name: float(fn(c))}, digits=digits))
    return name


TOY_METRICS = (
    _toy(
        "sw",
        "SW",
        "lower",
        lambda c: sliced_wasserstein(
            c.real, c.fake, int(c.settings["sw_projections"]), int(c.settings["seed"])
        ),
        4,
    ),
    _toy("mmd", "MMD", "lower", lambda c: mmd(c.real, c.fake, c.extra["bandwidth"]), 4),
    _toy(
        "mode_precision",
        "mode precision",
        "higher",
        lambda c: mode_precision(c.extra["truth"], c.fake, c.extra["label"]),
    ),
    _toy(
        "mode_coverage",
        "coverage",
        "higher",
        lambda c: mode_coverage(c.extra["truth"], c.fake, c.extra["label"]),
    ),
    _toy(
        "borrowing",
        "borrowing",
        "lower",
        lambda c: borrowing(c.extra["truth"], c.fake, c.extra["label"]),
    ),
    register(
        Metric(
            "unobserved_recall",
            "unobserved recall",
            "higher",
            lambda c: _maybe(
                "unobserved_recall",
                unobserved_recall(
                    c.extra["truth"], c.fake, c.extra["label"], c.extra["training_modes"]
                ),
                "the class's training draw shows all its sub-modes (none hidden)",
            ),
        )
    ).name,
    register(
        Metric(
            "memorization",
            "memorisation",
            "lower",
            lambda c: {
                "memorization": memorization(
                    c.fake, c.extra["train_points"], c.extra["memorization_radius"]
                ),
                "memorization_radius": float(c.extra["memorization_radius"]),
            },
        )
    ).name,
)
