"""A synthetic two-concept composition dataset: the IMBA paper's causal question (does the data
*distribution* or the data *scale* decide whether a model composes two concepts?) on a CPU.

Every sample shows two concepts, one from each of two vocabularies, in two tokens (the two
objects of a two-object image, each in its own region): token ``v`` (2 coordinates) is a draw
of ``N(mu_v[k], std^2 I)``, ``mu_v[k]`` the mean of concept ``k`` of vocabulary ``v``, placed at
angle ``2 pi k / K_v`` on a circle of radius ``radius`` in that token's plane. A sample of the
concept pair ``(a, b)`` is the point ``(token 0, token 1)`` in R^4.

The generative rule decides exactly which concept a token shows: the concept whose *hit ball*
(radius ``std sqrt(q_2)``, ``q_2`` the ``hit_quantile`` quantile of the chi-square law with 2
degrees of freedom) holds it, or none; the balls of one vocabulary are disjoint (checked), so
a token shows at most one concept. A generated sample *composes* ``(a, b)`` when token 0 shows
``a`` and token 1 shows ``b``; a true draw does so with probability ``hit_quantile^2``.

Classes are the concept pairs, vocabulary B major: class ``b K_A + a`` is ``(a, b)``, named
``"a<a>+b<b>"``. The long tail acts on the pairs through the ordinary imbalance profiles: with
``imbalance=step_ir<R>`` the first half of the classes (the pairs of B's first half, its *head
concepts*) keep ``n_per_class`` samples and the others (its *tail concepts*) ``int(n_per_class /
R)``, so a head concept appears in ``K_A n_per_class`` samples and a tail concept in
``K_A int(n_per_class / R)``: the paper's head / tail image counts at its ratio (100:1, 10:1)
and scale (3K / 0.03K, ...). Vocabulary A (two positions by default) stays balanced.

:class:`ConceptPairSource` draws a training pool of ``n_per_class`` samples per pair (the
profile keeps a seeded subset, as for images) and a balanced reference split, from the seed;
there are no files. Given the run's imbalance profile and ratio it refuses, when built (before
any training), a setting that would leave a concept pair without a sample.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.stats import chi2

from lt_diffusion.data.longtail import PROFILES, check_ratio, longtail_counts
from lt_diffusion.data.sources import SPLIT_NAMES, Source, VectorArrays

TOKEN_DIM = 2  # coordinates per token
VOCABULARIES = ("a", "b")  # token 0 shows a concept of A, token 1 one of B
_PAIR_NAME = re.compile(r"^a(\d+)\+b(\d+)$")
# Independent random streams of one source seed (training pool, reference split).
_TRAIN, _REFERENCE = 1, 2
# Every coordinate stays inside the samplers' final clamp to [-1, 1] (5 std: 3e-7 per draw).
_MAX_EXTENT = 1.0


def pair_name(a: int, b: int) -> str:
    """The class name of the concept pair ``(a, b)``: ``"a<a>+b<b>"``."""
    return f"a{int(a)}+b{int(b)}"


def parse_pair_name(name: str) -> tuple[int, int]:
    """``(a, b)`` of a class name written by :func:`pair_name`; a ValueError otherwise."""
    match = _PAIR_NAME.match(str(name))
    if match is None:
        raise ValueError(
            f"class name {name!r} is not a concept pair 'a<i>+b<j>': the concept-pair model "
            "needs the concept_pairs dataset (dataset=concept_pairs)"
        )
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ConceptPairs:
    """The generative rule: the concept means of each vocabulary, the token std and the hit
    balls that decide which concept a token shows.

    Attributes:
        means: per vocabulary, its concept means ``(K_v, 2)``.
        std: per-coordinate standard deviation of a token around its concept's mean.
        hit_quantile: a true token falls in its concept's hit ball with this probability.
    """

    means: tuple[np.ndarray, ...]
    std: float
    hit_quantile: float = 0.99

    def __post_init__(self) -> None:
        if len(self.means) != len(VOCABULARIES) or any(
            m.ndim != 2 or m.shape[1] != TOKEN_DIM or len(m) < 1 for m in self.means
        ):
            raise ValueError(
                f"means must hold {len(VOCABULARIES)} arrays (K_v, {TOKEN_DIM}), one per "
                f"vocabulary, got {[m.shape for m in self.means]}"
            )
        if not (self.std > 0 and 0.0 < self.hit_quantile < 1.0):
            raise ValueError(
                f"std must be > 0 and hit_quantile in (0, 1), got {self.std}, {self.hit_quantile}"
            )
        for v, m in enumerate(self.means):
            if len(m) > 1:
                gap = np.sqrt(((m[:, None] - m[None]) ** 2).sum(-1))[np.triu_indices(len(m), 1)]
                if gap.min() <= 2.0 * self.hit_radius:
                    raise ValueError(
                        f"two concepts of vocabulary {VOCABULARIES[v].upper()} are "
                        f"{gap.min():.3g} apart but hit balls have radius {self.hit_radius:.3g}: "
                        "they would overlap; lower dataset.source.std, raise radius, or use "
                        "fewer concepts"
                    )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Concepts per vocabulary, ``(K_A, K_B)``."""
        return tuple(len(m) for m in self.means)

    @property
    def tokens(self) -> int:
        return len(self.means)

    @property
    def dim(self) -> int:
        """Coordinates of a sample: tokens x 2."""
        return self.tokens * TOKEN_DIM

    @cached_property
    def hit_radius(self) -> float:
        """``std sqrt(q_2)``: the distance within which a token shows a concept."""
        return float(self.std * math.sqrt(chi2.ppf(self.hit_quantile, TOKEN_DIM)))

    def sample(self, pair: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws of the concept pair ``pair``, float64 ``(n, 4)``."""
        centre = np.concatenate([self.means[v][int(k)] for v, k in enumerate(pair)])
        return centre + self.std * rng.standard_normal((int(n), self.dim))

    def mean_of(self, pair: tuple[int, int]) -> np.ndarray:
        """The mean of a pair's samples, ``(4,)``."""
        return np.concatenate([self.means[v][int(k)] for v, k in enumerate(pair)])

    def shown(self, points: np.ndarray) -> np.ndarray:
        """Per sample and token, the concept the token shows (its index in the token's
        vocabulary), or -1 for none; ``(N, tokens)`` int64."""
        x = np.asarray(points, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must be (N, {self.dim}), got {x.shape}")
        out = np.empty((len(x), self.tokens), dtype=np.int64)
        for v, means in enumerate(self.means):
            token = x[:, v * TOKEN_DIM : (v + 1) * TOKEN_DIM]
            d2 = ((token[:, None, :] - means[None, :, :]) ** 2).sum(-1)  # (N, K_v)
            nearest = d2.argmin(1)  # the balls are disjoint: only the nearest can hold it
            out[:, v] = np.where(d2.min(1) <= self.hit_radius**2, nearest, -1)
        return out

    def composes(self, points: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
        """Whether each sample shows both concepts of ``pair`` (token 0 shows ``a`` and token 1
        shows ``b``), ``(N,)`` bool."""
        return (self.shown(points) == np.asarray(pair, dtype=np.int64)[None, :]).all(1)


def circle_concepts(
    sizes: tuple[int, int], radius: float = 0.7, std: float = 0.05, hit_quantile: float = 0.99
) -> ConceptPairs:
    """Each vocabulary's ``K_v`` concepts evenly on a circle of ``radius`` in its token's
    plane (concept ``k`` at angle ``2 pi k / K_v``); a clear error for a layout that cannot
    hold."""
    if len(sizes) != len(VOCABULARIES) or any(int(k) < 1 for k in sizes):
        raise ValueError(
            f"dataset.source.concepts_a and concepts_b must be >= 1, got {list(sizes)}"
        )
    if radius <= 0 or std <= 0:
        raise ValueError(f"dataset.source needs radius > 0 and std > 0, got {radius}, {std}")
    if radius + 5.0 * std > _MAX_EXTENT:
        raise ValueError(
            f"tokens reach {radius + 5 * std:.3g} from the origin (radius + 5 std): the samplers "
            "clamp to [-1, 1]; lower dataset.source.radius or std"
        )
    means = []
    for k in sizes:
        angle = 2.0 * np.pi * np.arange(int(k)) / int(k)
        means.append(radius * np.stack([np.cos(angle), np.sin(angle)], axis=1))
    return ConceptPairs(tuple(means), float(std), float(hit_quantile))


def class_pairs(sizes: tuple[int, int]) -> list[tuple[int, int]]:
    """The concept pair of every class, vocabulary B major: class ``b K_A + a`` is ``(a, b)``."""
    k_a, k_b = (int(k) for k in sizes)
    return [(a, b) for b in range(k_b) for a in range(k_a)]


def tail_concepts(k_b: int) -> list[int]:
    """The concepts of vocabulary B that the step profile makes rare: its second half (their
    pairs are the second half of the classes)."""
    return list(range(int(k_b) - int(k_b) // 2, int(k_b)))


def pair_counts(n_per_class: int, sizes: tuple[int, int], profile: str, ratio: float) -> list[int]:
    """Training samples per concept pair (class order) under an imbalance profile, as the
    datamodule will keep them; a ValueError naming the pairs left without a sample."""
    if profile not in PROFILES:
        raise ValueError(f"unknown long-tail profile {profile!r}: choose one of {PROFILES}")
    pairs = class_pairs(sizes)
    if profile == "native":  # the pool itself: every pair keeps n_per_class
        return [int(n_per_class)] * len(pairs)
    ratio = check_ratio(ratio)
    try:
        return longtail_counts(profile, int(n_per_class), len(pairs), ratio)
    except ValueError:  # the rarest pairs get no sample: say which
        pass
    n = len(pairs)
    if profile == "exp":
        counts = [int(n_per_class * (1 / ratio) ** (c / max(n - 1, 1))) for c in range(n)]
    else:
        counts = [int(n_per_class)] * (n // 2) + [int(n_per_class / ratio)] * (n - n // 2)
    empty = [pair_name(*pairs[c]) for c, k in enumerate(counts) if k < 1]
    raise ValueError(
        f"imbalance ratio {ratio:g} ({profile} profile) at dataset.source.n_per_class="
        f"{n_per_class} leaves the concept pair(s) {', '.join(empty)} without a training "
        f"sample: the rarest pair gets int({n_per_class} / {ratio:g}) = 0. Raise "
        f"dataset.source.n_per_class to at least {math.ceil(ratio)} or lower the ratio"
    )


class ConceptPairSource(Source):
    """Samples of every concept pair of :func:`circle_concepts` (float32 ``(N, 4)``, no files).

    ``train``: ``n_per_class`` samples of every pair (the pool the imbalance profile
    subsamples); ``test``: ``n_reference`` fresh samples of every pair (the balanced reference
    split). ``profile`` / ``ratio``: the run's imbalance (the dataset config passes them), so
    that a setting leaving a pair without a sample is refused here, when the data are built.
    """

    data_kind = "vector"
    reference_split = "test"
    native_size = 0  # not images

    def __init__(
        self,
        concepts_a: int = 2,
        concepts_b: int = 8,
        radius: float = 0.7,
        std: float = 0.05,
        hit_quantile: float = 0.99,
        n_per_class: int = 1500,
        n_reference: int = 500,
        profile: str = "native",
        ratio: float = 1.0,
        seed: int = 0,
        name: str = "concept_pairs",
    ) -> None:
        # No root: the data are generated (Source's root / download do not apply).
        if int(n_per_class) < 1 or int(n_reference) < 1:
            raise ValueError(
                f"dataset.source.n_per_class and n_reference must be >= 1, got {n_per_class} "
                f"and {n_reference}"
            )
        sizes = (int(concepts_a), int(concepts_b))
        if sizes[1] < 2:
            raise ValueError(
                f"dataset.source.concepts_b must be >= 2 (head and tail concepts), got {sizes[1]}"
            )
        self.rule = circle_concepts(sizes, radius, std, hit_quantile)
        self.pairs = class_pairs(sizes)
        self.counts = pair_counts(int(n_per_class), sizes, profile, ratio)
        self.name = str(name)
        self.num_classes = len(self.pairs)
        self.channels = self.rule.dim
        self.class_names = [pair_name(a, b) for a, b in self.pairs]
        self.n_per_class, self.n_reference = int(n_per_class), int(n_reference)
        self.seed = int(seed)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.rule.sizes

    def load(self, split: str) -> VectorArrays:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        stream, n = (
            (_TRAIN, self.n_per_class) if split == "train" else (_REFERENCE, self.n_reference)
        )
        rng = np.random.default_rng([self.seed, stream])
        points = np.concatenate([self.rule.sample(p, n, rng) for p in self.pairs])
        labels = np.repeat(np.arange(self.num_classes, dtype=np.int64), n)
        return VectorArrays(points.astype(np.float32), labels)

    def __repr__(self) -> str:
        return (
            f"ConceptPairSource(name={self.name!r}, concepts={list(self.sizes)}, "
            f"n_per_class={self.n_per_class}, seed={self.seed})"
        )
