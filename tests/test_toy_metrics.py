"""The synthetic benchmark's exact metrics against independent computations (scipy's 1-D
Wasserstein distance, a direct double loop for the MMD) and on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from lt_diffusion.data.toy import GaussianMixtureClasses, constellation_mixture, ring_mixture
from lt_diffusion.evaluation import toy_metrics as TM


@pytest.fixture(scope="module")
def truth() -> GaussianMixtureClasses:
    return ring_mixture(num_classes=6, modes_per_class=2, dim=2, radius=0.75, std=0.03)


def draw(truth: GaussianMixtureClasses, c: int, n: int, seed: int) -> np.ndarray:
    return truth.sample(c, n, np.random.default_rng(seed))


def test_wasserstein_1d_is_scipys_for_unequal_sizes() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5, 37))
    v = rng.standard_t(3, size=(5, 23)) + 0.4
    v[:, :4] = u[:, :4]  # ties between the two samples
    ours = TM.wasserstein_1d(u, v)
    expected = [wasserstein_distance(a, b) for a, b in zip(u, v)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-14)


def test_sliced_wasserstein_in_one_dimension_is_the_wasserstein_distance() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 1)), rng.exponential(size=(200, 1))
    # In 1-D every direction is +1 or -1, and W_1 does not see the sign.
    assert TM.sliced_wasserstein(a, b, num_projections=7) == pytest.approx(
        wasserstein_distance(a[:, 0], b[:, 0]), rel=1e-12
    )


def test_sliced_wasserstein_is_the_mean_over_its_fixed_directions() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(120, 3)), rng.normal(0.3, 1.2, size=(90, 3))
    theta = TM.projection_directions(3, 16, seed=5)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0)
    direct = np.mean([wasserstein_distance(a @ d, b @ d) for d in theta])
    assert TM.sliced_wasserstein(a, b, 16, seed=5) == pytest.approx(direct, rel=1e-12)
    # Fixed by the seed: the same number twice, another with another seed.
    assert TM.sliced_wasserstein(a, b, 16, seed=5) == TM.sliced_wasserstein(a, b, 16, seed=5)
    assert TM.sliced_wasserstein(a, b, 16, seed=6) != TM.sliced_wasserstein(a, b, 16, seed=5)


def test_mmd_is_the_unbiased_estimate_of_a_double_loop() -> None:
    rng = np.random.default_rng(3)
    x, y, h = rng.normal(size=(13, 2)), rng.normal(0.5, 1.0, size=(9, 2)), 0.7

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * h * h)))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert TM.mmd(x, y, h) == pytest.approx(xx + yy - 2 * xy, rel=1e-10, abs=1e-13)


def test_true_draws_score_like_the_truth(truth: GaussianMixtureClasses) -> None:
    """Fresh draws of a class: distances near 0, precision near the hit probability, no
    borrowing, coverage near 1."""
    q = truth.hit_quantile
    for c in range(truth.num_classes):
        real, gen = draw(truth, c, 2000, seed=c), draw(truth, c, 2000, seed=100 + c)
        assert TM.sliced_wasserstein(real, gen) < 0.02
        assert abs(TM.mmd(real, gen, truth.hit_radius)) < 2e-3
        # Binomial(2000, 0.99): 5 standard deviations.
        assert abs(TM.mode_precision(truth, gen, c) - q) < 5 * np.sqrt(q * (1 - q) / 2000)
        assert TM.borrowing(truth, gen, c) == 0.0  # the balls are 7.8 std apart
        assert TM.mode_coverage(truth, gen, c) > 0.97


def test_another_classs_draws_score_as_borrowed(truth: GaussianMixtureClasses) -> None:
    real, other = draw(truth, 0, 1000, seed=0), draw(truth, 1, 1000, seed=1)
    same = draw(truth, 0, 1000, seed=2)
    assert TM.sliced_wasserstein(real, other) > 10 * TM.sliced_wasserstein(real, same)
    assert TM.mmd(real, other, truth.hit_radius) > 0.3
    assert TM.mode_precision(truth, other, 0) == 0.0
    assert TM.mode_coverage(truth, other, 0) == 0.0
    assert TM.borrowing(truth, other, 0) == pytest.approx(truth.hit_quantile, abs=0.02)


def test_coverage_loses_a_dropped_modes_weight(truth: GaussianMixtureClasses) -> None:
    """Every point on the major mode: precision stays high, coverage is the major mode's
    share of the class's mass (its weight), exactly."""
    rng = np.random.default_rng(4)
    c, n = 2, 3000
    major = truth.means[c, 0] + truth.std * rng.standard_normal((n, 2))
    assert TM.mode_precision(truth, major, c) > 0.97
    assert TM.mode_coverage(truth, major, c) == pytest.approx(truth.weights[c, 0], abs=1e-12)
    # Points on no mode at all (the ring's centre): nothing hits anything.
    centre = 0.01 * rng.standard_normal((n, 2))
    assert TM.mode_precision(truth, centre, c) == TM.borrowing(truth, centre, c) == 0.0


def test_metrics_refuse_bad_input(truth: GaussianMixtureClasses) -> None:
    pts = draw(truth, 0, 10, seed=0)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        TM.mode_precision(truth, np.zeros((5, 3)), 0)
    with pytest.raises(ValueError, match="class 9"):
        TM.borrowing(truth, pts, 9)
    with pytest.raises(ValueError, match="bandwidth"):
        TM.mmd(pts, pts, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        TM.sliced_wasserstein(pts, np.full((3, 2), np.nan))


def _brute_hits(truth: GaussianMixtureClasses, points: np.ndarray) -> list[int]:
    """Each point's mode (or -1) by a loop over every mode's hit ball."""
    out = []
    for p in points:
        inside = [
            m
            for m, mean in enumerate(truth.mode_means)
            if sum((p[d] - mean[d]) ** 2 for d in range(truth.dim)) <= truth.hit_radius**2
        ]
        out.append(inside[0] if inside else -1)
    return out


def test_unobserved_recall_is_a_brute_force_count_of_the_hidden_modes() -> None:
    truth = constellation_mixture(3, 4, dim=2, radius=0.6, spread=0.12, std=0.02)
    rng = np.random.default_rng(7)
    modes = np.ones((3, 4), dtype=bool)
    modes[1, [0, 2]] = False  # class 1 never showed sub-modes 0 and 2
    for _ in range(4):
        # Points on a random mix of modes, some on none, some on other classes' modes.
        k = rng.integers(0, truth.mode_means.shape[0] + 2, size=37)
        pts = np.where(
            (k < truth.mode_means.shape[0])[:, None],
            truth.mode_means[np.minimum(k, truth.mode_means.shape[0] - 1)],
            rng.uniform(-0.9, 0.9, (37, 2)),
        ) + truth.std * rng.standard_normal((37, 2))
        hits = _brute_hits(truth, pts)
        q, w = truth.hit_quantile, truth.weights[1]
        want = sum(min(hits.count(4 + j) / 37, q * w[j]) for j in (0, 2)) / (q * (w[0] + w[2]))
        assert TM.unobserved_recall(truth, pts, 1, modes) == pytest.approx(want, abs=1e-12)
    assert TM.unobserved_recall(truth, pts, 0, modes) is None  # nothing hidden
    exact = np.repeat(truth.means[1, [0, 2]], [500, 500], axis=0)  # all on the hidden two
    assert TM.unobserved_recall(truth, exact, 1, modes) == pytest.approx(1.0)


def test_memorization_is_a_brute_force_count_of_near_copies() -> None:
    rng = np.random.default_rng(3)
    for dim in (2, 16):
        train = rng.uniform(-1, 1, (60, dim))
        near = train[:10] + 0.01 * rng.standard_normal((10, dim))
        gen = np.concatenate([near, rng.uniform(-1, 1, (30, dim))])
        for radius in (0.02, 0.3, 0.9):
            want = np.mean(
                [any(np.sqrt(((g - t) ** 2).sum()) <= radius for t in train) for g in gen]
            )
            assert TM.memorization(gen, train, radius) == pytest.approx(want, abs=0)
    with pytest.raises(ValueError, match="radius"):
        TM.memorization(gen, train, 0.0)
