"""Many / Medium / Few class splits.

"thirds" (CM paper, after Jiang et al. 2021): rank classes by training count, the top third is
Many, the middle third Medium, the rest Few: CIFAR-10 0-2 / 3-5 / 6-9, CIFAR-100 0-32 / 33-65 /
66-99. "counts" (ImageNet-LT convention, Liu et al. 2019): Many above ``many_threshold`` images,
Few below ``few_threshold``, Medium in between.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("many", "medium", "few")
RULES = ("thirds", "counts")


def check_rule(rule: str) -> str:
    """``rule`` itself, or a ValueError listing the valid ones."""
    if rule not in RULES:
        raise ValueError(
            f"unknown split rule {rule!r}: choose one of {', '.join(RULES)} (dataset.split_rule)"
        )
    return rule


def split_map(
    counts: Sequence[int],
    rule: str = "thirds",
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> list[str]:
    """The split name ("many" / "medium" / "few") of every class index."""
    check_rule(rule)
    n = len(counts)
    if n == 0:
        raise ValueError("split_map needs the count of at least one class")
    if rule == "thirds":
        # Rank by count, stable, so equal counts keep index order (class 0 first).
        order = np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")
        n_many = max(1, n // 3)
        n_medium = n // 3
        out = [""] * n
        for rank, c in enumerate(order):
            if rank < n_many:
                out[c] = "many"
            elif rank < n_many + n_medium:
                out[c] = "medium"
            else:
                out[c] = "few"
        return out
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})"
        )
    return [
        "many" if k > many_threshold else "few" if k < few_threshold else "medium" for k in counts
    ]


def classes_in_split(splits: Sequence[str], split: str) -> list[int]:
    """Class indices whose split is ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return [c for c, s in enumerate(splits) if s == split]
