"""Long-tail profiles: the LDAM counts and subset, reproduced exactly."""

from __future__ import annotations

import numpy as np
import pytest

from lt_diffusion.data.longtail import (
    PROFILES,
    longtail_counts,
    longtail_indices,
    native_counts,
    order_by_count,
)

# LDAM passes imb_factor = 1 / IR as a literal (0.01 for IR 100, ...).
LDAM_FACTOR = {10: 0.1, 50: 0.02, 100: 0.01, 200: 0.005}


def ldam_img_num_per_cls(n_images: int, cls_num: int, imb_type: str, imb_factor: float):
    """LDAM's get_img_num_per_cls, written out independently (float img_max, 1.0 divisor)."""
    img_max = n_images / cls_num
    out = []
    if imb_type == "exp":
        for cls_idx in range(cls_num):
            out.append(int(img_max * (imb_factor ** (cls_idx / (cls_num - 1.0)))))
    else:
        out = [int(img_max)] * (cls_num // 2) + [int(img_max * imb_factor)] * (cls_num // 2)
    return out


def ldam_subset(targets: np.ndarray, img_num_per_cls: list[int], seed: int) -> np.ndarray:
    """LDAM's gen_imbalanced_data with its global ``np.random.seed`` + ``np.random.shuffle``.

    The legacy global stream is the point here: it is what LDAM's code runs.
    """
    state = np.random.get_state()  # noqa: NPY002
    try:
        np.random.seed(seed)  # noqa: NPY002
        chosen = []
        for the_class, the_img_num in zip(np.unique(targets), img_num_per_cls):
            idx = np.where(targets == the_class)[0]
            np.random.shuffle(idx)  # noqa: NPY002
            chosen.append(idx[:the_img_num])
        return np.concatenate(chosen)
    finally:
        np.random.set_state(state)  # noqa: NPY002


def shuffled_labels(per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize(
    "n_max,classes,ratio,total,head,tail",
    [
        (5000, 10, 100, 12406, 5000, 50),  # CIFAR-10-LT IR 100
        (5000, 10, 50, 13996, 5000, 100),  # CIFAR-10-LT IR 50
        (500, 100, 100, 10847, 500, 5),  # CIFAR-100-LT IR 100
    ],
)
def test_published_totals(n_max, classes, ratio, total, head, tail) -> None:
    counts = longtail_counts("exp", n_max, classes, ratio)
    assert len(counts) == classes
    assert sum(counts) == total
    assert counts[0] == head and counts[-1] == tail
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_cifar10_ir100_counts_exactly() -> None:
    assert longtail_counts("exp", 5000, 10, 100) == [
        5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50,
    ]  # fmt: skip


@pytest.mark.parametrize("ratio", [10, 50, 100, 200])
@pytest.mark.parametrize("classes,per_class", [(10, 5000), (100, 500)])
def test_counts_equal_ldam_formula(ratio: int, classes: int, per_class: int) -> None:
    expected = ldam_img_num_per_cls(classes * per_class, classes, "exp", LDAM_FACTOR[ratio])
    assert longtail_counts("exp", per_class, classes, ratio) == expected


def test_balanced_and_step_profiles() -> None:
    assert longtail_counts("exp", 5000, 10, 1) == [5000] * 10
    assert longtail_counts("step", 5000, 10, 100) == [5000] * 5 + [50] * 5
    assert longtail_counts("step", 5000, 10, 100) == ldam_img_num_per_cls(50000, 10, "step", 0.01)
    # Odd class counts: the head is the first half rounded down, every class gets a count.
    assert longtail_counts("step", 100, 7, 10) == [100] * 3 + [10] * 4
    assert longtail_counts("exp", 7, 1, 100) == [7]


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("classes,per_class,ratio", [(10, 500, 100), (100, 50, 10)])
def test_subset_equals_ldam_loop(seed: int, classes: int, per_class: int, ratio: int) -> None:
    labels = shuffled_labels(per_class, classes, seed=seed + 1)
    counts = longtail_counts("exp", per_class, classes, ratio)
    ours = longtail_indices(labels, counts, seed)
    theirs = ldam_subset(labels, counts, seed)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels[ours], minlength=classes), counts)
    assert len(np.unique(ours)) == len(ours)  # no image twice


def test_subset_depends_on_seed_only() -> None:
    labels = shuffled_labels(100, 10)
    counts = longtail_counts("exp", 100, 10, 10)
    a, b = longtail_indices(labels, counts, 0), longtail_indices(labels, counts, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, longtail_indices(labels, counts, 1))
    # It does not touch NumPy's global stream (LDAM's code does; ours must not).
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    longtail_indices(labels, counts, 5)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002


@pytest.mark.parametrize("ratio", [0.5, 0, -3, float("nan"), float("inf")])
def test_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="imbalance ratio must be >= 1.*ir1"):
        longtail_counts("exp", 5000, 10, ratio)


def test_unknown_profile_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown long-tail profile 'linear'") as err:
        longtail_counts("linear", 5000, 10, 100)
    for p in PROFILES:
        assert p in str(err.value)


def test_ratio_too_large_for_the_class_size() -> None:
    with pytest.raises(ValueError, match="leaves the last class with 0 of 20 images"):
        longtail_counts("exp", 20, 10, 100)
    assert longtail_counts("exp", 20, 10, 20)[-1] == 1


def test_class_with_too_few_images() -> None:
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="class 1 has 3 images but the profile asks for 4"):
        longtail_indices(labels, [10, 4], 0)


def test_order_by_count_is_stable_and_descending() -> None:
    counts = [3, 5, 5, 1, 7, 3]
    perm = order_by_count(counts)
    np.testing.assert_array_equal(perm, [4, 1, 2, 0, 5, 3])
    # Relabelling by argsort(perm) makes the counts non-increasing, class 0 the largest.
    old_to_new = np.argsort(perm)
    new_counts = [0] * len(counts)
    for old, k in enumerate(counts):
        new_counts[old_to_new[old]] = k
    assert new_counts == [7, 5, 5, 3, 3, 1]
    np.testing.assert_array_equal(order_by_count([5, 4, 4, 1]), [0, 1, 2, 3])


def test_native_counts() -> None:
    assert native_counts(np.array([2, 0, 2, 2, 1]), 4) == [1, 1, 3, 0]
