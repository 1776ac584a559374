"""Many / Medium / Few split rules."""

from __future__ import annotations

import pytest

from lt_diffusion.data.longtail import longtail_counts
from lt_diffusion.data.splits import SPLITS, classes_in_split, split_map


def spans(splits: list[str]) -> dict[str, list[int]]:
    return {s: classes_in_split(splits, s) for s in SPLITS}


def test_cifar10_thirds_as_in_the_cm_paper() -> None:
    splits = split_map(longtail_counts("exp", 5000, 10, 100))
    assert spans(splits) == {
        "many": [0, 1, 2],
        "medium": [3, 4, 5],
        "few": [6, 7, 8, 9],
    }


def test_cifar100_thirds_as_in_the_cm_paper() -> None:
    got = spans(split_map(longtail_counts("exp", 500, 100, 100)))
    assert got == {
        "many": list(range(0, 33)),
        "medium": list(range(33, 66)),
        "few": list(range(66, 100)),
    }


@pytest.mark.parametrize(
    "n,many,medium",
    [(1, 1, 0), (2, 1, 0), (3, 1, 1), (4, 1, 1), (7, 2, 2), (8, 2, 2), (9, 3, 3), (1000, 333, 333)],
)
def test_thirds_sizes_for_any_number_of_classes(n: int, many: int, medium: int) -> None:
    splits = split_map(list(range(n, 0, -1)))
    assert splits == ["many"] * many + ["medium"] * medium + ["few"] * (n - many - medium)


def test_two_classes_are_many_and_few() -> None:
    assert split_map([900, 100]) == ["many", "few"]  # CelebA-HQ female / male


def test_thirds_ranks_by_count_not_by_index() -> None:
    # Unsorted counts with ties: rank by count, ties by index.
    counts = [5, 50, 5, 20, 50, 1, 20]
    assert split_map(counts) == ["few", "many", "few", "medium", "many", "few", "medium"]
    assert split_map([4, 4, 4, 4, 4, 4, 4]) == ["many"] * 2 + ["medium"] * 2 + ["few"] * 3


def test_counts_rule_imagenet_lt_thresholds() -> None:
    counts = [1280, 101, 100, 20, 19, 5]
    assert split_map(counts, rule="counts") == ["many", "many", "medium", "medium", "few", "few"]
    assert split_map(counts, rule="counts", many_threshold=1000, few_threshold=6) == [
        "many", "medium", "medium", "medium", "medium", "few",
    ]  # fmt: skip


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown split rule 'halves'.*thirds, counts"):
        split_map([3, 2, 1], rule="halves")
    with pytest.raises(ValueError, match="at least one"):
        split_map([])
    with pytest.raises(ValueError, match="few_threshold"):
        split_map([3, 2, 1], rule="counts", many_threshold=10, few_threshold=20)
    with pytest.raises(ValueError, match="unknown split 'tail'"):
        classes_in_split(["many"], "tail")
