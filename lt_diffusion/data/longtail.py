"""Long-tail profiles (Cao et al. 2019, LDAM), reproduced exactly as CBDM / OC / CM build them.

Exponential: ``n_c = int(n_max * (1 / IR) ** (c / (C - 1)))`` with classes in their original
order; step: the first half of the classes keep ``n_max``, the rest ``int(n_max / IR)``.
Inside each class, in class order, LDAM shuffles the class's indices with one global NumPy
stream seeded once and keeps the first ``n_c``; ``RandomState(seed)`` is that same stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROFILES = ("exp", "step")


def check_ratio(ratio: float) -> float:
    if not ratio >= 1:
        raise ValueError(
            f"imbalance ratio must be >= 1 (max class count / min class count), got {ratio}: "
            "use imbalance=ir1 for the balanced set"
        )
    return float(ratio)


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown long-tail profile {profile!r}: choose one of {PROFILES}")
    return profile


def longtail_counts(profile: str, n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Images kept per class, class 0 the head."""
    check_profile(profile)
    ratio = check_ratio(ratio)
    if num_classes == 1:
        return [n_max]
    if profile == "exp":
        # Same float expression as LDAM's get_img_num_per_cls, so int() truncates identically.
        return [int(n_max * (1 / ratio) ** (c / (num_classes - 1))) for c in range(num_classes)]
    half = num_classes // 2
    return [n_max] * half + [int(n_max / ratio)] * (num_classes - half)


def longtail_indices(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices of the long-tailed subset: per class (in class order) a seeded shuffle, first
    ``counts[c]`` kept. Returned grouped by class, as LDAM concatenates them."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n:
            raise ValueError(
                f"class {c} has {len(idx)} images but the profile asks for {n}: lower the "
                "ratio's n_max or check the dataset files"
            )
        rng.shuffle(idx)
        chosen.append(idx[:n])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def order_by_count(counts: Sequence[int]) -> np.ndarray:
    """Permutation listing classes by descending count (stable): ``perm[new] = old``."""
    return np.argsort(-np.asarray(counts), kind="stable")
