"""Long-tail profiles (Cao et al. 2019, LDAM), reproduced exactly as CBDM / OC / CM build them.

Exponential: ``n_c = int(n_max * (1 / IR) ** (c / (C - 1)))`` with classes in their original
order; step: the first half of the classes keep ``n_max``, the rest ``int(n_max / IR)``.
Inside each class, in class order, LDAM shuffles the class's indices with one global NumPy
stream seeded once and keeps the first ``n_c``; ``RandomState(seed)`` is that same stream.

"native" keeps every image of a dataset that is long-tailed already (ImageNet-LT,
iNaturalist); its counts come from the labels, not from a formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PROFILES = ("exp", "step", "native")


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float, or a ValueError saying how to fix it."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"imbalance ratio must be a number >= 1, got {ratio!r}") from None
    if not (value >= 1 and math.isfinite(value)):  # also catches NaN
        raise ValueError(
            f"imbalance ratio must be >= 1 and finite (max class count / min class count), "
            f"got {ratio}: use imbalance=ir1 for the balanced set"
        )
    return value


def check_profile(profile: str) -> str:
    """``profile`` itself, or a ValueError listing the valid ones."""
    if profile not in PROFILES:
        raise ValueError(
            f"unknown long-tail profile {profile!r}: choose one of {', '.join(PROFILES)} "
            "(imbalance.profile)"
        )
    return profile


def longtail_counts(profile: str, n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Images kept per class (class 0 the head) for the "exp" or "step" profile."""
    check_profile(profile)
    ratio = check_ratio(ratio)
    if profile == "native":
        raise ValueError(
            "the 'native' profile keeps the data's own counts: use native_counts(labels, "
            "num_classes) instead of longtail_counts"
        )
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"need num_classes >= 1 and n_max >= 1, got {num_classes} and {n_max}")
    if num_classes == 1:
        return [int(n_max)]
    if profile == "exp":
        # The float expression of LDAM's get_img_num_per_cls, so that int() truncates the same
        # way (1 / 100 is the same double as LDAM's literal imb_factor 0.01).
        counts = [int(n_max * (1 / ratio) ** (c / (num_classes - 1))) for c in range(num_classes)]
    else:
        half = num_classes // 2
        counts = [int(n_max)] * half + [int(n_max / ratio)] * (num_classes - half)
    if counts[-1] < 1:
        raise ValueError(
            f"the {profile} profile with ratio {ratio:g} leaves the last class with 0 of "
            f"{n_max} images: use a ratio of at most {n_max} or a dataset with more images "
            "per class"
        )
    return counts


def native_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Images per class of an already long-tailed split (the "native" profile)."""
    return [int(k) for k in np.bincount(np.asarray(labels), minlength=num_classes)]


def longtail_indices(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices of the long-tailed subset, grouped by class as LDAM concatenates them.

    Per class ``c`` in order 0..C-1: ``idx = where(labels == c)``, shuffled by the single
    ``RandomState(seed)`` shared across classes, first ``counts[c]`` kept.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n:
            raise ValueError(
                f"class {c} has {len(idx)} images but the profile asks for {n}: the dataset "
                "files look incomplete (check them or download again), or lower n_max"
            )
        rng.shuffle(idx)
        chosen.append(idx[:n])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def order_by_count(counts: Sequence[int]) -> np.ndarray:
    """Classes by descending count, ties by index: ``perm[new] = old``.

    Relabelling class ``perm[k]`` as ``k`` makes class 0 the most frequent (the project's
    convention); ``np.argsort(perm)`` maps old labels to new ones.
    """
    return np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")
