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

The *constellation* layout (:func:`constellation_mixture`, the transfer variant) gives every
class the same constellation of ``K`` sub-modes, a regular ``K``-gon of radius ``spread``
around the class's own centre on the ring (the same shape, only translated): what one class
teaches about the constellation holds for every other. Its source can hide sub-modes from the
training pool (``hidden``: per class, how many of its sub-modes have no training point), so that
a tail class's training draw misses part of its density, which sharing with the other classes
might recover.

A point *hits* a mode when its squared distance to the mean is at most ``std^2 q_D``, ``q_D``
the ``hit_quantile`` quantile of the chi-square law with ``D`` degrees of freedom: a true draw
of a mode hits it with probability exactly ``hit_quantile``. The layout is refused when two
hit balls overlap, so a point hits at most one mode.

:class:`ToySource` draws the data from the mixture with a seed (there is no file): a training
pool of ``n_per_class`` points per class, which the long-tail profile subsamples like an image
dataset, a separate, balanced reference split of ``n_reference`` points per class (the *test*
draws the benchmark's records compare with), and a *validation* split of ``n_validation``
fresh points per class, for choosing hyperparameters without looking at the test draws.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.stats import chi2

from lt_diffusion.data.sources import Source, VectorArrays

# Independent random streams of one source seed (layout, training pool, reference split,
# validation split, the choice of hidden sub-modes).
_LAYOUT, _TRAIN, _REFERENCE, _VALIDATION, _HIDDEN = 0, 1, 2, 3, 4
SOURCE_SPLITS = ("train", "test", "validation")
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

    def sample(
        self, c: int, n: int, rng: np.random.Generator, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """``n`` draws of class ``c``, float64 ``(n, D)``; ``weights`` (K,) replaces the class's
        mode weights (a training pool without some sub-modes)."""
        p = self.weights[c] if weights is None else np.asarray(weights, dtype=np.float64)
        k = rng.choice(self.modes_per_class, size=n, p=p / p.sum())
        return self.means[c, k] + self.std * rng.standard_normal((n, self.dim))

    def log_density(self, x: np.ndarray, c: int) -> np.ndarray:
        """``log p(x | c)`` of every point, float64 ``(N,)``."""
        x = np.asarray(x, dtype=np.float64)
        d2 = ((x[:, None, :] - self.means[c][None]) ** 2).sum(-1)
        log_norm = -0.5 * self.dim * math.log(2.0 * math.pi * self.std**2)
        terms = np.log(np.maximum(self.weights[c], 1e-300))[None] - d2 / (2.0 * self.std**2)
        top = terms.max(1, keepdims=True)
        return log_norm + top[:, 0] + np.log(np.exp(terms - top).sum(1))

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
    C, K, D = _check_layout(num_classes, modes_per_class, dim, radius, lift, std, weight_ratio)
    rng = np.random.default_rng([int(seed), _LAYOUT])
    j = np.arange(C * K)
    angle = 2.0 * np.pi * j / (C * K)
    flat = np.zeros((C * K, D))
    flat[:, 0], flat[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    flat = _lift_and_turn(flat, lift, rng)
    # Mode j is class j mod C's (j // C)-th mode: neighbours on the ring differ in class.
    means = flat.reshape(K, C, D).transpose(1, 0, 2).copy()
    return _checked(means, _weights(C, K, weight_ratio), std, hit_quantile)


def _check_layout(
    num_classes: int, modes: int, dim: int, radius: float, lift: float, std: float,
    weight_ratio: float, extra: float = 0.0,
) -> tuple[int, int, int]:  # fmt: skip
    """The settings common to both layouts, checked; ``extra``: how far modes reach beyond
    the ring's radius in its plane (the constellation's spread)."""
    if int(num_classes) < 1 or int(modes) < 1:
        raise ValueError(
            f"dataset.num_classes and dataset.source.modes_per_class must be >= 1, got "
            f"{num_classes} and {modes}"
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
    extent = math.hypot(radius + extra, lift) + 5.0 * std
    if extent > _MAX_EXTENT:
        raise ValueError(
            f"modes reach {extent:.3g} from the origin (sqrt((radius + spread)^2 + lift^2) + "
            "5 std): the samplers clamp to [-1, 1]; lower dataset.source.radius / spread / "
            "lift / std"
        )
    return int(num_classes), int(modes), int(dim)


def _weights(num_classes: int, modes: int, weight_ratio: float) -> np.ndarray:
    w = weight_ratio ** np.arange(modes, dtype=np.float64)
    return np.tile(w / w.sum(), (num_classes, 1))


def _lift_and_turn(flat: np.ndarray, lift: float, rng: np.random.Generator) -> np.ndarray:
    """In ``D > 2``: each row moved by ``lift`` along its own random direction off the plane of
    the first two coordinates, then the whole layout turned by a uniformly random rotation."""
    n, D = flat.shape
    if D == 2:
        return flat
    off = rng.standard_normal((n, D - 2))
    flat[:, 2:] = lift * off / np.linalg.norm(off, axis=1, keepdims=True)
    q, r = np.linalg.qr(rng.standard_normal((D, D)))
    return flat @ (q * np.sign(np.diag(r))).T  # a uniformly random rotation (Haar)


def _checked(
    means: np.ndarray, weights: np.ndarray, std: float, hit_quantile: float
) -> GaussianMixtureClasses:
    """The mixture, refused when two modes' hit balls overlap."""
    mix = GaussianMixtureClasses(means, weights, float(std), float(hit_quantile))
    gap = mix.min_mode_distance()
    if mix.mode_means.shape[0] > 1 and gap <= 2.0 * mix.hit_radius:
        raise ValueError(
            f"two modes are {gap:.3g} apart but hit balls have radius {mix.hit_radius:.3g}: "
            "the classes would overlap; lower dataset.source.std, raise radius (or spread), or "
            "use fewer classes / modes_per_class"
        )
    return mix


def constellation_mixture(
    num_classes: int,
    modes_per_class: int = 4,
    dim: int = 2,
    radius: float = 0.65,
    spread: float = 0.1,
    std: float = 0.02,
    lift: float = 0.0,
    weight_ratio: float = 1.0,
    hit_quantile: float = 0.99,
    seed: int = 0,
) -> GaussianMixtureClasses:
    """The transfer layout: class ``c``'s centre on the ring (angle ``2 pi c / C``), its ``K``
    sub-modes at ``centre + spread (cos(2 pi k / K + pi / K), sin(...))``, the same
    constellation for every class. In ``D > 2`` each class centre is lifted off the plane by
    ``lift`` along its own random direction (its sub-modes with it) and the layout is turned by
    a random rotation, as :func:`ring_mixture` does."""
    if not spread > 0:
        raise ValueError(f"dataset.source.spread must be > 0, got {spread}")
    C, K, D = _check_layout(
        num_classes, modes_per_class, dim, radius, lift, std, weight_ratio, extra=spread
    )
    rng = np.random.default_rng([int(seed), _LAYOUT])
    angle = 2.0 * np.pi * np.arange(C) / C
    centres = np.zeros((C, D))
    centres[:, 0], centres[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    phase = 2.0 * np.pi * np.arange(K) / K + np.pi / K
    offsets = np.zeros((K, D))
    offsets[:, 0], offsets[:, 1] = spread * np.cos(phase), spread * np.sin(phase)
    flat = (centres[:, None, :] + offsets[None, :, :]).reshape(C * K, D)
    if D > 2:  # one lift per class (its constellation moves with it), then one rotation
        off = rng.standard_normal((C, D - 2))
        lifts = lift * off / np.linalg.norm(off, axis=1, keepdims=True)
        flat[:, 2:] = np.repeat(lifts, K, axis=0)
        q, r = np.linalg.qr(rng.standard_normal((D, D)))
        flat = flat @ (q * np.sign(np.diag(r))).T
    means = flat.reshape(C, K, D).copy()
    return _checked(means, _weights(C, K, weight_ratio), std, hit_quantile)


LAYOUTS = {"ring": ring_mixture, "constellation": constellation_mixture}


class ToySource(Source):
    """Points drawn from :func:`ring_mixture` or :func:`constellation_mixture` (float32
    ``(N, D)``, no files).

    ``train``: ``n_per_class`` points of every class (the pool a long-tail profile subsamples),
    drawn only from the class's training sub-modes (all of them unless ``hidden`` says
    otherwise); ``test``: ``n_reference`` fresh points of every class (the balanced reference
    split the records compare with, drawn from another stream of the same seed);
    ``validation``: ``n_validation`` fresh points of every class (hyperparameter choice), the
    reference split of source seed ``validation_seed`` (null: a stream of its own). Both
    reference splits are drawn from the full class densities. The same settings always give
    the same points.

    ``hidden`` (constellation layout): per class, in the source's class order (class 0 the
    head under the long-tail profiles), how many of its sub-modes get no training point; which
    ones is a seeded choice (:attr:`training_modes`).
    """

    data_kind = "vector"
    reference_split = "test"
    native_size = 0  # not images

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 2,
        layout: str = "ring",
        hidden: Sequence[int] | None = None,
        n_per_class: int = 5000,
        n_reference: int = 2000,
        n_validation: int = 2000,
        seed: int = 0,
        validation_seed: int | None = None,
        name: str = "toy",
        **geometry: float,
    ) -> None:
        """``geometry``: the layout function's keywords (``modes_per_class``, ``radius``,
        ``std``, ...; its defaults for the ones not given)."""
        # No root: the data are generated (Source's root / download do not apply).
        for key, n in (("n_per_class", n_per_class), ("n_reference", n_reference),
                       ("n_validation", n_validation)):  # fmt: skip
            if int(n) < 1:
                raise ValueError(f"dataset.source.{key} must be >= 1, got {n}")
        if layout not in LAYOUTS:
            raise ValueError(
                f"dataset.source.layout must be one of {list(LAYOUTS)}, got {layout!r}"
            )
        make = LAYOUTS[layout]
        known = [
            k for k in inspect.signature(make).parameters if k not in ("num_classes", "dim", "seed")
        ]
        unknown = sorted(set(geometry) - set(known))
        if unknown:
            raise ValueError(
                f"dataset.source.{unknown[0]} is not a setting of the {layout} layout: it takes "
                f"{known}"
            )
        if validation_seed is not None and int(validation_seed) == int(seed):
            raise ValueError(
                f"dataset.source.validation_seed={validation_seed} is the source's own seed: its "
                "reference split would be the test draws themselves, and hyperparameters chosen "
                "on it would be chosen on the test set. Set another seed, or null (a stream of "
                "its own)"
            )
        self.mixture = make(num_classes, dim=dim, seed=seed, **geometry)
        self.name = str(name)
        self.num_classes = int(num_classes)
        self.channels = int(dim)
        self.class_names = [f"class {c}" for c in range(self.num_classes)]
        self.n_per_class, self.n_reference = int(n_per_class), int(n_reference)
        self.n_validation = int(n_validation)
        self.seed = int(seed)
        self.validation_seed = None if validation_seed is None else int(validation_seed)
        self.training_modes = _training_modes(self.mixture, hidden, layout, self.seed)

    def load(self, split: str) -> VectorArrays:
        if split not in SOURCE_SPLITS:
            raise ValueError(f"split must be one of {SOURCE_SPLITS}, got {split!r}")
        if split == "train":
            rng, n = np.random.default_rng([self.seed, _TRAIN]), self.n_per_class
            pool = [self.training_weights(c) for c in range(self.num_classes)]
        elif split == "test":
            rng, n = np.random.default_rng([self.seed, _REFERENCE]), self.n_reference
            pool = [None] * self.num_classes
        else:
            own = self.validation_seed is None
            key = [self.seed, _VALIDATION] if own else [self.validation_seed, _REFERENCE]
            rng, n = np.random.default_rng(key), self.n_validation
            pool = [None] * self.num_classes
        points = np.concatenate(
            [self.mixture.sample(c, n, rng, pool[c]) for c in range(self.num_classes)]
        )
        labels = np.repeat(np.arange(self.num_classes, dtype=np.int64), n)
        return VectorArrays(points.astype(np.float32), labels)

    def training_weights(self, c: int) -> np.ndarray:
        """Class ``c``'s mode weights in the training pool: its own, zero on hidden sub-modes."""
        return np.where(self.training_modes[c], self.mixture.weights[c], 0.0)

    def check_training_set(self, points: np.ndarray, labels: np.ndarray) -> None:
        """Refuse a long-tailed training set (labels in the source's class order) in which a
        class misses other sub-modes than its hidden ones: the missed sub-modes are then
        exactly the configured ones (a tiny tail count could miss one more by chance). Without
        hidden sub-modes there is nothing to check: a tail class that misses a mode by chance
        is the long tail itself."""
        if self.training_modes.all():
            return
        hit = self.mixture.hit_mode(points)
        K = self.mixture.modes_per_class
        for c in range(self.num_classes):
            own = hit[(labels == c) & (hit >= 0)] - c * K
            seen = np.zeros(K, dtype=bool)
            seen[own[(own >= 0) & (own < K)]] = True
            lost = np.flatnonzero(self.training_modes[c] & ~seen)
            if lost.size:
                n = int((labels == c).sum())
                raise ValueError(
                    f"the long-tailed training set gives class {c} {n} points, none of them on "
                    f"its training sub-modes {lost.tolist()}: it would miss more sub-modes than "
                    "dataset.source.hidden says. Hide fewer sub-modes of that class, or change "
                    "imbalance.seed / the ratio"
                )

    def __repr__(self) -> str:
        return (
            f"ToySource(name={self.name!r}, num_classes={self.num_classes}, dim={self.channels}, "
            f"seed={self.seed})"
        )


def _training_modes(
    mixture: GaussianMixtureClasses, hidden: Sequence[int] | None, layout: str, seed: int
) -> np.ndarray:
    """``(C, K)`` bool: which sub-modes of each class have training points."""
    C, K = mixture.num_classes, mixture.modes_per_class
    modes = np.ones((C, K), dtype=bool)
    if hidden is None or not any(int(h) for h in hidden):
        return modes
    hidden = [int(h) for h in hidden]
    if layout != "constellation":
        raise ValueError(
            "dataset.source.hidden needs the constellation layout (dataset.source.layout="
            "constellation): the ring's classes share no structure that could stand in for a "
            "hidden mode"
        )
    if len(hidden) != C:
        raise ValueError(f"dataset.source.hidden must give one count per class ({C}), got {hidden}")
    for c, h in enumerate(hidden):
        if not 0 <= h < K:
            raise ValueError(
                f"dataset.source.hidden gives class {c} {h} hidden sub-modes of {K}: its "
                f"training draw would miss {'every' if h >= K else 'a negative number of'} "
                f"sub-mode(s). Hide 0 to {K - 1} of them"
            )
    rng = np.random.default_rng([int(seed), _HIDDEN])
    for c, h in enumerate(hidden):
        modes[c, rng.choice(K, size=h, replace=False)] = False
    return modes
