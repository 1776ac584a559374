"""Many / Medium / Few class splits.

"thirds" (CM paper, after Jiang et al. 2021): rank classes by training count, the top third is
Many, the middle third Medium, the rest Few: CIFAR-10 0-2 / 3-5 / 6-9, CIFAR-100 0-32 / 33-65 /
66-99. "counts" (ImageNet-LT convention, Liu et al. 2019): Many above ``many_threshold`` images,
Few below ``few_threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("many", "medium", "few")
RULES = ("thirds", "counts")


def split_map(
    counts: Sequence[int],
    rule: str = "thirds",
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> list[str]:
    """The split name of every class index."""
    n = len(counts)
    if rule == "thirds":
        order = np.argsort(-np.asarray(counts), kind="stable")
        n_many = max(1, n // 3)
        n_medium = n // 3
        out = [""] * n
        for rank, c in enumerate(order):
            out[c] = "many" if rank < n_many else "medium" if rank < n_many + n_medium else "few"
        return out
    if rule == "counts":
        return [
            "many" if k > many_threshold else "few" if k < few_threshold else "medium"
            for k in counts
        ]
    raise ValueError(f"unknown split rule {rule!r}: choose one of {RULES}")


def classes_in_split(splits: Sequence[str], split: str) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    return [c for c, s in enumerate(splits) if s == split]
