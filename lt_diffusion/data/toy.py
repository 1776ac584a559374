"""The synthetic long-tailed benchmark: classes with known Gaussian-mixture densities.

Every class ``c`` is a mixture of ``K`` isotropic Gaussians ``N(mu_ck, std^2 I)`` with weights
``w_ck`` (``w_ck`` proportional to ``weight_ratio^k``: a major and smaller modes). The ``C K``
modes sit on a ring of radius ``radius``, at angles ``2 pi j / (C K)``, mode ``j`` belonging to
class ``j mod C``: neighbouring modes belong to different classes, and each class's modes are
spread around the ring. The classes are separable (the hit balls below are disjoint) but near
each other, so a sample of one class that drifts lands on another class's mode: the
"borrowing" of tail classes from head classes (CORAL paper, Sec. 1; CM paper, Sec. 1) becomes
directly measurable. The IMBA paper's 2-D study (Sec. 3) motivates the 2-D case.

In ``dim > 2`` dimensions each mode also gets an offset of norm ``lift`` along its own seeded
random direction orthogonal to the ring's plane, and the whole layout is turned by a seeded
random rotation, so that every coordinate carries signal and the task is not a 2-D one in
disguise.

Scale: every coordinate stays within ``sqrt(radius^2 + lift^2) + 5 std`` of 0 (the shipped
configs keep it below 0.95), the range the samplers' final clamp to ``[-1, 1]`` assumes.

A point *hits* a mode when its squared distance to the mean is at most ``std^2 q_D``, ``q_D``
the ``hit_quantile`` quantile of the chi-square law with ``D`` degrees of freedom: a true draw
of a mode hits it with probability exactly ``hit_quantile``. The layout is refused when two
hit balls overlap, so a point hits at most one mode.

:class:`ToySource` draws the data from the mixture with a seed (there is no file): a training
pool of ``n_per_class`` points per class, which the long-tail profile subsamples like an image
dataset, and a separate, balanced reference split of ``n_reference`` points per class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.stats import chi2

from lt_diffusion.data.sources import SPLIT_NAMES, Source, VectorArrays

# Independent random streams of one source seed (layout, training pool, reference split).
_LAYOUT, _TRAIN, _REFERENCE = 0, 1, 2
# Coordinates must stay inside the samplers' final clamp to [-1, 1] (5 std: 3e-7 per draw).
_MAX_EXTENT = 1.0


@dataclass(frozen=True)
class GaussianMixtureClasses:
    """The true class-conditional densities: ``p(x | c) = sum_k w_ck N(x; mu_ck, std^2 I)``.

    Attributes:
        means: ``(C, K, D)`` mode means.
        weights: ``(C, K)`` mode weights, each row summing to 1.
        std: the per-coordinate standard deviation of every mode.
        hit_quantile: a draw of a mode falls in that mode's hit ball with this probability.
    """

    means: np.ndarray
    weights: np.ndarray
    std: float
    hit_quantile: float = 0.99

    def __post_init__(self) -> None:
        if self.means.ndim != 3 or self.weights.shape != self.means.shape[:2]:
            raise ValueError(
                f"means must be (C, K, D) and weights (C, K), got {self.means.shape} and "
                f"{self.weights.shape}"
            )
        if not np.allclose(self.weights.sum(1), 1.0) or (self.weights < 0).any():
            raise ValueError("every class's mode weights must be >= 0 and sum to 1")
        if not (self.std > 0 and 0.0 < self.hit_quantile < 1.0):
            raise ValueError(
                f"std must be > 0 and hit_quantile in (0, 1), got {self.std}, {self.hit_quantile}"
            )

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def modes_per_class(self) -> int:
        return int(self.means.shape[1])

    @property
    def dim(self) -> int:
        return int(self.means.shape[2])

    @property
    def hit_radius(self) -> float:
        """``std sqrt(q_D)``: the distance within which a point hits a mode."""
        return float(self.std * math.sqrt(chi2.ppf(self.hit_quantile, self.dim)))

    @cached_property
    def mode_means(self) -> np.ndarray:
        """Every mode's mean, ``(C K, D)``, class-major (mode ``c K + k`` is class c's k-th)."""
        return self.means.reshape(-1, self.dim)

    @cached_property
    def mode_class(self) -> np.ndarray:
        """The class of every mode of :attr:`mode_means`, ``(C K,)`` int64."""
        return np.repeat(np.arange(self.num_classes), self.modes_per_class)

    def min_mode_distance(self) -> float:
        """The smallest distance between two mode means."""
        m = self.mode_means
        d = np.sqrt(((m[:, None, :] - m[None, :, :]) ** 2).sum(-1))
        d[np.diag_indices_from(d)] = np.inf
        return float(d.min())

    def sample(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws of class ``c``, float64 ``(n, D)``."""
        k = rng.choice(self.modes_per_class, size=n, p=self.weights[c])
        return self.means[c, k] + self.std * rng.standard_normal((n, self.dim))

    def hit_mode(self, points: np.ndarray) -> np.ndarray:
        """The mode (index into :attr:`mode_means`) each point hits, or -1; ``(N,)`` int64.

        The hit balls are disjoint, so the nearest mode is the only candidate.
        """
        x = np.asarray(points, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must be (N, {self.dim}), got {x.shape}")
        if len(x) == 0:
            return np.zeros(0, dtype=np.int64)
        # Squared distances in chunks: (N, M, D) at once would hold N M D floats.
        nearest = np.empty(len(x), dtype=np.int64)
        dist2 = np.empty(len(x))
        for start in range(0, len(x), 4096):
            part = x[start : start + 4096]
            d2 = ((part[:, None, :] - self.mode_means[None, :, :]) ** 2).sum(-1)
            nearest[start : start + 4096] = d2.argmin(1)
            dist2[start : start + 4096] = d2.min(1)
        return np.where(dist2 <= self.hit_radius**2, nearest, -1)


def ring_mixture(
    num_classes: int,
    modes_per_class: int = 2,
    dim: int = 2,
    radius: float = 0.75,
    std: float = 0.03,
    lift: float = 0.0,
    weight_ratio: float = 0.6,
    hit_quantile: float = 0.99,
    seed: int = 0,
) -> GaussianMixtureClasses:
    """The ring layout of the module docstring; a clear error for one that cannot hold."""
    if int(num_classes) < 1 or int(modes_per_class) < 1:
        raise ValueError(
            f"dataset.num_classes and dataset.source.modes_per_class must be >= 1, got "
            f"{num_classes} and {modes_per_class}"
        )
    if int(dim) < 2:
        raise ValueError(f"dataset.channels (the dimension) must be >= 2, got {dim}")
    if not 0.0 < weight_ratio <= 1.0:
        raise ValueError(
            f"dataset.source.weight_ratio must be in (0, 1] (1: equal modes), got {weight_ratio}"
        )
    if radius <= 0 or lift < 0 or std <= 0:
        raise ValueError(
            f"dataset.source needs radius > 0, lift >= 0 and std > 0, got {radius}, {lift}, {std}"
        )
    if dim == 2 and lift > 0:
        raise ValueError("dataset.source.lift needs dim > 2 (there is no room off the ring)")
    extent = math.hypot(radius, lift) + 5.0 * std
    if extent > _MAX_EXTENT:
        raise ValueError(
            f"modes reach {extent:.3g} from the origin (sqrt(radius^2 + lift^2) + 5 std): the "
            "samplers clamp to [-1, 1]; lower dataset.source.radius / lift / std"
        )
    C, K, D = int(num_classes), int(modes_per_class), int(dim)
    rng = np.random.default_rng([int(seed), _LAYOUT])
    j = np.arange(C * K)
    angle = 2.0 * np.pi * j / (C * K)
    flat = np.zeros((C * K, D))
    flat[:, 0], flat[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    if D > 2:
        off = rng.standard_normal((C * K, D - 2))
        flat[:, 2:] = lift * off / np.linalg.norm(off, axis=1, keepdims=True)
        q, r = np.linalg.qr(rng.standard_normal((D, D)))
        flat = flat @ (q * np.sign(np.diag(r))).T  # a uniformly random rotation (Haar)
    # Mode j is class j mod C's (j // C)-th mode: neighbours on the ring differ in class.
    means = flat.reshape(K, C, D).transpose(1, 0, 2).copy()
    w = weight_ratio ** np.arange(K, dtype=np.float64)
    weights = np.tile(w / w.sum(), (C, 1))
    mix = GaussianMixtureClasses(means, weights, float(std), float(hit_quantile))
    gap = mix.min_mode_distance()
    if C * K > 1 and gap <= 2.0 * mix.hit_radius:
        raise ValueError(
            f"two modes are {gap:.3g} apart but hit balls have radius {mix.hit_radius:.3g}: "
            "the classes would overlap; lower dataset.source.std, raise radius, or use fewer "
            "classes / modes_per_class"
        )
    return mix


class ToySource(Source):
    """Points drawn from :func:`ring_mixture` (float32 ``(N, D)``, no files).

    ``train``: ``n_per_class`` points of every class (the pool a long-tail profile subsamples);
    ``test``: ``n_reference`` fresh points of every class (the balanced reference split,
    drawn from another stream of the same seed). The same settings always give the same points.
    """

    data_kind = "vector"
    reference_split = "test"
    native_size = 0  # not images

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 2,
        modes_per_class: int = 2,
        radius: float = 0.75,
        std: float = 0.03,
        lift: float = 0.0,
        weight_ratio: float = 0.6,
        hit_quantile: float = 0.99,
        n_per_class: int = 5000,
        n_reference: int = 2000,
        seed: int = 0,
        name: str = "toy",
    ) -> None:
        # No root: the data are generated (Source's root / download do not apply).
        if int(n_per_class) < 1 or int(n_reference) < 1:
            raise ValueError(
                f"dataset.source.n_per_class and n_reference must be >= 1, got {n_per_class} "
                f"and {n_reference}"
            )
        self.mixture = ring_mixture(
            num_classes, modes_per_class, dim, radius, std, lift, weight_ratio, hit_quantile, seed
        )
        self.name = str(name)
        self.num_classes = int(num_classes)
        self.channels = int(dim)
        self.class_names = [f"class {c}" for c in range(self.num_classes)]
        self.n_per_class, self.n_reference = int(n_per_class), int(n_reference)
        self.seed = int(seed)

    def load(self, split: str) -> VectorArrays:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        stream, n = (
            (_TRAIN, self.n_per_class) if split == "train" else (_REFERENCE, self.n_reference)
        )
        rng = np.random.default_rng([self.seed, stream])
        points = np.concatenate([self.mixture.sample(c, n, rng) for c in range(self.num_classes)])
        labels = np.repeat(np.arange(self.num_classes, dtype=np.int64), n)
        return VectorArrays(points.astype(np.float32), labels)

    def __repr__(self) -> str:
        return (
            f"ToySource(name={self.name!r}, num_classes={self.num_classes}, dim={self.channels}, "
            f"seed={self.seed})"
        )
