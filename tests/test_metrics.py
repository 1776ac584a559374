"""Metrics against independent implementations on random features (no Inception pass), and the
reference-statistics cache (with a stand-in extractor)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.record import _check_entry
from lt_diffusion.evaluation.reference import (
    StaleCacheWarning,
    cache_path,
    full_key,
    reference_features,
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


# ---------------------------------------------------------------------------- compare_features


def test_compare_features_records_counts_settings_and_unavailable_is() -> None:
    real, fake = _two_sets(30, 20, 16, seed=8)
    entry = M.compare_features(
        real, fake, ["fid", "kid", "precision", "recall", "is"],
        kid_subset_size=1000, kid_subsets=5, pr_k=5, seed=0,
        is_unavailable="no logits layer in these weights",
    )  # fmt: skip
    assert entry["n_real"] == 30 and entry["n_generated"] == 20
    assert entry["fid"] == pytest.approx(M.fid(M.statistics(real), M.statistics(fake)))
    assert entry["kid_subset_size"] == 20 and entry["kid_subsets"] == 5
    assert entry["pr_k"] == 5
    assert (entry["precision"], entry["recall"]) == pytest.approx(pr_numpy(real, fake, 5))
    assert entry["is"] is None and "logits" in entry["is_unavailable"]
    assert any("capped" in note for note in entry["notes"])
    assert _check_entry(entry, "entry") == []


def test_compare_features_refuses_unknown_metrics_and_too_few_images() -> None:
    real, fake = _two_sets(30, 20, 4, seed=9)
    with pytest.raises(ValueError, match="unknown metrics"):
        M.compare_features(real, fake, ["fid", "fd_dinov2"])
    with pytest.raises(M.TooFewImagesError):
        M.compare_features(real, fake[:3], ["precision"], pr_k=5)


# ---------------------------------------------------------------------------- reference cache


class _FakeExtractor(nn.Module):
    """Deterministic stand-in for the Inception extractor (same interface), counting images."""

    features_list = ["2048"]

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(3, 2048, generator=torch.Generator().manual_seed(0)))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        self.seen += len(x)
        return (x.float().mean(dim=(2, 3)) @ self.proj + x.float().std(dim=(1, 2, 3))[:, None],)


INFO = {"name": "fake", "weights_sha256": "a" * 64}


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)


def _key(**over) -> dict:
    return {"dataset": "toy", "subset": {"classes": [0, 1]}, "image_size": 8, "n": 12, **over}


def test_reference_features_are_cached_under_their_key(tmp_path) -> None:
    ext = _FakeExtractor()
    first = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path)
    assert not first.from_cache and ext.seen == 12
    assert first.pool.dtype == np.float64 and first.pool.shape == (12, 2048)
    again = reference_features(_key(), lambda: pytest.fail("recomputed"), ext, INFO, tmp_path)
    assert again.from_cache and ext.seen == 12
    np.testing.assert_array_equal(again.pool, first.pool)
    np.testing.assert_allclose(again.stats.sigma, M.statistics(first.pool).sigma, rtol=1e-12)
    assert again.key["extractor_sha256"] == INFO["weights_sha256"] and again.key["format"] >= 1


def test_another_subset_or_extractor_never_reuses_the_statistics(tmp_path) -> None:
    ext = _FakeExtractor()
    a = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path)
    b = reference_features(
        _key(subset={"classes": [0, 2]}), lambda: _images(12, 1), ext, INFO, tmp_path
    )
    c = reference_features(
        _key(), lambda: _images(12, 2), ext, {**INFO, "weights_sha256": "b" * 64}, tmp_path
    )
    assert len({a.path, b.path, c.path}) == 3
    assert not b.from_cache and not c.from_cache and ext.seen == 36
    assert not np.array_equal(a.pool, b.pool)


def test_corrupt_or_mismatched_cache_files_are_recomputed(tmp_path) -> None:
    ext = _FakeExtractor()
    a = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path)
    good = a.path.read_bytes()
    # 1. garbage
    a.path.write_bytes(b"not an npz")
    with pytest.warns(StaleCacheWarning, match="cannot be read"):
        r = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path)
    assert not r.from_cache
    np.testing.assert_array_equal(r.pool, a.pool)
    # 2. another key's file under this key's name (e.g. copied by hand)
    b = reference_features(_key(n=6), lambda: _images(6, 3), ext, INFO, tmp_path)
    a.path.write_bytes(b.path.read_bytes())
    with pytest.warns(StaleCacheWarning, match="stored key differs"):
        r = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path)
    np.testing.assert_array_equal(r.pool, a.pool)
    # 3. statistics that do not belong to the features
    with np.load(a.path) as f:
        arrays = dict(f)
    arrays["mu"] = arrays["mu"] + 1.0
    with open(a.path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(StaleCacheWarning, match="mean does not match"):
        r = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path)
    assert not r.from_cache and a.path.read_bytes() == good


def test_a_key_that_does_not_describe_the_images_is_refused_before_extraction(tmp_path) -> None:
    ext = _FakeExtractor()
    with pytest.raises(ValueError, match="n=12 but images_fn returned 10"):
        reference_features(_key(), lambda: _images(10, 0), ext, INFO, tmp_path)
    with pytest.raises(ValueError, match="image_size=32"):
        reference_features(_key(image_size=32), lambda: _images(12, 0), ext, INFO, tmp_path)
    with pytest.raises(ValueError, match="lacks \\['subset'\\]"):
        full_key({"dataset": "toy", "image_size": 8, "n": 12}, INFO)
    assert ext.seen == 0


def test_small_sets_can_skip_stored_statistics(tmp_path) -> None:
    ext = _FakeExtractor()
    r = reference_features(_key(), lambda: _images(12, 0), ext, INFO, tmp_path, with_stats=False)
    with np.load(cache_path(r.key, tmp_path)) as f:
        assert "mu" not in f.files and f["pool"].dtype == np.float32  # lossless float32
    np.testing.assert_allclose(r.stats.mu, r.pool.mean(0), rtol=1e-12)
