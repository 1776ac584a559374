"""Metrics against independent implementations on random features (no Inception pass), and the
reference-statistics cache (with a stand-in extractor)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.record import Entry
from lt_diffusion.evaluation.reference import (
    StaleCacheWarning,
    cache_key,
    cached_features,
    key_hash,
)

# Small random sets: the rank-deficiency warning is expected here.
pytestmark = pytest.mark.filterwarnings(
    "ignore::lt_diffusion.evaluation.metrics.SmallSampleWarning"
)

# ---------------------------------------------------------------------------- FID


class _Lookup(nn.Module):
    """A torchmetrics 'feature extractor' returning precomputed features by the index that
    the pixel (0, 0, 0) of each image carries: torchmetrics then does its own statistics."""

    def __init__(self, feats: np.ndarray) -> None:
        super().__init__()
        self.feats = torch.from_numpy(feats)
        self.num_features = feats.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feats[x[:, 0, 0, 0].long()]


def torchmetrics_fid(a: np.ndarray, b: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = np.concatenate([a, b]).astype(np.float64)
    tm = FrechetInceptionDistance(feature=_Lookup(feats), antialias=False)
    idx = torch.arange(len(feats), dtype=torch.float64)[:, None, None, None].expand(-1, 3, 1, 1)
    tm.update(idx[: len(a)], real=True)
    tm.update(idx[len(a) :], real=False)
    return float(tm.compute())


def _two_sets(n_a: int, n_b: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, d))
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(loc=0.2, scale=1.1, size=(n_b, d)) @ mix
    return a, b


@pytest.mark.parametrize("n_a,n_b,d", [(400, 300, 64), (700, 600, 2048)])
def test_fid_equals_torchmetrics_on_the_same_features(n_a: int, n_b: int, d: int) -> None:
    a, b = _two_sets(n_a, n_b, d, seed=d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.SmallSampleWarning)  # 2048-d from 700: rank-deficient
        ours = M.fid(M.statistics(a), M.statistics(b))
    theirs = torchmetrics_fid(a, b)
    assert ours > 1.0
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)


def test_fid_of_diagonal_gaussians_has_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = M.fid((mu1, np.diag(v1)), {"mu": mu2, "sigma": np.diag(v2)})
    assert got == pytest.approx(want, rel=1e-9)
    assert M.fid((mu2, np.diag(v2)), (mu1, np.diag(v1))) == pytest.approx(want, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero() -> None:
    a, _ = _two_sets(500, 2, 64, seed=1)
    s = M.statistics(a)
    assert abs(M.fid(s, s)) < 1e-9 * np.trace(s.sigma)


def test_statistics_are_float64_mean_and_unbiased_covariance() -> None:
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(50, 8)).astype(np.float32)
    s = M.statistics(x)
    x64 = x.astype(np.float64)
    centred = x64 - x64.sum(0) / len(x64)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64 and s.n == 50
    np.testing.assert_allclose(s.mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, centred.T @ centred / 49, rtol=1e-10)


def test_statistics_refuse_one_image_and_warn_below_the_dimension() -> None:
    with pytest.raises(M.TooFewImagesError, match="at least 2"):
        M.statistics(np.zeros((1, 4)))
    with pytest.warns(M.SmallSampleWarning, match="rank-deficient"):
        M.statistics(np.random.default_rng(0).normal(size=(10, 20)))
    with pytest.raises(ValueError, match="NaN"):
        M.statistics(np.full((3, 2), np.nan))


# ---------------------------------------------------------------------------- KID


def kid_numpy(x: np.ndarray, y: np.ndarray, subsets: int, m: int, seed: int):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over the subsets torch-fidelity draws
    (RandomState(seed): real subset, then generated subset, without replacement)."""
    rng = np.random.RandomState(seed)
    d = x.shape[1]
    vals = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = (((u @ v.T) / d + 1) ** 3 for u, v in ((xs, xs), (ys, ys), (xs, ys)))
        off = m * (m - 1)
        vals.append(
            (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
            - 2 * kxy.sum() / (m * m)
        )  # fmt: skip
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_equals_numpy_unbiased_mmd_with_cubic_kernel() -> None:
    x, y = _two_sets(90, 70, 24, seed=3)
    got = M.kid(x, y, subset_size=40, subsets=9, seed=5)
    mean, std = kid_numpy(x, y, 9, 40, 5)
    assert got.subset_size == 40
    assert got.mean == pytest.approx(mean, rel=1e-9)
    assert got.std == pytest.approx(std, rel=1e-9)


def test_kid_caps_the_subset_size_at_the_smaller_set_and_reports_it() -> None:
    x, y = _two_sets(80, 12, 16, seed=4)
    mean, std, size = M.kid(x, y, subset_size=1000, subsets=6, seed=0)
    assert size == 12
    assert mean == pytest.approx(kid_numpy(x, y, 6, 12, 0)[0], rel=1e-9)
    with pytest.raises(M.TooFewImagesError, match="KID"):
        M.kid(x, y[:1], subset_size=1000, subsets=2)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two() -> None:
    rng = np.random.default_rng(6)
    same = M.kid(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), 200, 20, 0).mean
    shifted = M.kid(rng.normal(size=(400, 8)), rng.normal(1.0, 1, size=(400, 8)), 200, 20, 0)
    assert abs(same) < 0.1 * shifted.mean and shifted.mean > 0


# ---------------------------------------------------------------------------- Precision / Recall


def pr_numpy(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.: a sample is covered when it lies within the distance of some other
    set's sample to that sample's k-th nearest neighbour (itself excluded)."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the sample itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d_fr = dist(fake, real)
    precision = (d_fr <= r_real[None, :]).any(axis=1).mean()
    recall = (d_fr.T <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equal_a_direct_knn(k: int) -> None:
    rng = np.random.default_rng(k)
    real = rng.normal(size=(45, 6))
    fake = rng.normal(0.6, 0.7, size=(35, 6))
    want = pr_numpy(real, fake, k)
    # torch-fidelity averages in float32: 1e-6 still sees a single sample counted differently
    assert M.precision_recall(real, fake, k) == pytest.approx(want, abs=1e-6)
    # torch-fidelity's blockwise path (large sets) gives the same numbers
    blockwise = M.precision_recall(real, fake, k, memory_budget=200)
    assert blockwise == pytest.approx(want, abs=1e-6)
    assert 0.0 < want[0] < 1.0 or 0.0 < want[1] < 1.0  # the test can see a swap of roles


def test_precision_recall_roles_are_not_swapped() -> None:
    # Generated samples collapsed onto a small region of the real support: high precision,
    # low recall.
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 2))
    fake = rng.normal(scale=0.05, size=(60, 2))
    p, r = M.precision_recall(real, fake, k=3)
    assert p > 0.9 and r < 0.3


def test_precision_recall_need_more_than_k_images() -> None:
    with pytest.raises(M.TooFewImagesError, match="at least 6"):
        M.precision_recall(np.zeros((5, 3)), np.ones((10, 3)), k=5)


# ---------------------------------------------------------------------------- IS


def is_numpy(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    x = logits[np.random.RandomState(seed).permutation(len(logits))]
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(x), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        q = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(q))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_equals_numpy() -> None:
    logits = np.random.default_rng(7).normal(scale=3.0, size=(60, 1008))
    mean, std = M.inception_score(logits, splits=4)
    want = is_numpy(logits, 4, M.IS_SEED)
    assert (mean, std) == pytest.approx(want, rel=1e-9)
    assert mean > 1.5
    # One class for every sample: IS = 1
    assert M.inception_score(np.tile(logits[:1], (10, 1)), splits=2)[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the registry


def _comparison(real, fake, **settings) -> M.Comparison:
    base = {"kid_subset_size": 1000, "kid_subsets": 5, "pr_k": 5, "seed": 0, "is_splits": 10}
    return M.Comparison(
        real, fake, {**base, **settings}, is_unavailable="no logits layer in these weights"
    )


def test_compare_records_counts_settings_and_unavailable_is() -> None:
    real, fake = _two_sets(30, 20, 16, seed=8)
    entry = M.compare(_comparison(real, fake), ["fid", "kid", "precision", "recall", "is"])
    assert entry["n_real"] == 30 and entry["n_generated"] == 20
    assert entry["fid"] == pytest.approx(M.fid(M.statistics(real), M.statistics(fake)))
    assert entry["kid_subset_size"] == 20 and entry["kid_subsets"] == 5
    assert entry["pr_k"] == 5
    assert (entry["precision"], entry["recall"]) == pytest.approx(pr_numpy(real, fake, 5))
    assert entry["is"] is None and "logits" in entry["is_unavailable"]
    assert any("capped" in note for note in entry["notes"])
    Entry.model_validate(entry)  # a valid record entry


def test_compare_refuses_unknown_metrics_and_too_few_images() -> None:
    real, fake = _two_sets(30, 20, 4, seed=9)
    with pytest.raises(ValueError, match="unknown metrics"):
        M.compare(_comparison(real, fake), ["fid", "fd_alexnet"])
    with pytest.raises(M.TooFewImagesError):
        M.compare(_comparison(real, fake[:3]), ["precision"])


def test_a_new_metric_is_one_registry_entry(monkeypatch) -> None:
    """What docs/extending.md promises: register it, and the evaluator's comparison, the
    record's validation and the table specs accept it."""
    from lt_diffusion.evaluation import record
    from lt_diffusion.tables.spec import metric_path_ok

    mean_gap = M.Metric(
        "mean_gap", "mean gap", "lower",
        lambda c: {"mean_gap": float(np.abs(c.real.mean(0) - c.fake.mean(0)).sum())},
    )  # fmt: skip
    monkeypatch.setitem(M.METRICS, "mean_gap", mean_gap)  # M.register, undone after the test
    real, fake = _two_sets(10, 10, 3, seed=1)
    entry = M.compare(_comparison(real, fake), ["mean_gap"])
    assert entry["mean_gap"] == pytest.approx(np.abs(real.mean(0) - fake.mean(0)).sum())
    record.Entry.model_validate(entry)
    with pytest.raises(ValueError, match="finite number"):
        record.Entry.model_validate({**entry, "mean_gap": float("nan")})
    assert metric_path_ok("per_split.few.mean_gap")


# ---------------------------------------------------------------------------- feature cache


def test_features_are_cached_under_their_key_and_bad_files_recomputed(tmp_path) -> None:
    calls = []

    def compute(v):
        calls.append(v)
        return np.full((2, 3), v, np.float32)

    k1, k2 = cache_key(dataset="d", classes=[0]), cache_key(dataset="d", classes=[1])
    assert cached_features(k1, lambda: compute(1.0), tmp_path)[0, 0] == 1.0
    assert cached_features(k1, lambda: compute(9.0), tmp_path)[0, 0] == 1.0  # cached
    assert cached_features(k2, lambda: compute(2.0), tmp_path)[0, 0] == 2.0  # other key
    (f1,) = [f for f in (tmp_path / "real_features").iterdir() if key_hash(k1) in f.name]
    f1.write_bytes(b"garbage")
    with pytest.warns(StaleCacheWarning, match="cannot be read"):
        assert cached_features(k1, lambda: compute(3.0), tmp_path)[0, 0] == 3.0
    # another key's file under this key's name (e.g. copied by hand)
    (f2,) = [f for f in (tmp_path / "real_features").iterdir() if key_hash(k2) in f.name]
    f1.write_bytes(f2.read_bytes())
    with pytest.warns(StaleCacheWarning, match="stored key differs"):
        assert cached_features(k1, lambda: compute(4.0), tmp_path)[0, 0] == 4.0
    assert calls == [1.0, 2.0, 3.0, 4.0]
