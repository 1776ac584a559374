"""Metrics against independent implementations, the offline Inception against its source, and
the protocol's bookkeeping. Only tens of images go through Inception (about 7 per second here)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.inception import load_extractor, load_torchscript
from lt_diffusion.evaluation.protocol import (
    comparisons,
    images_per_class,
    real_images_per_class,
)

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def extractor():
    ext, info = load_extractor("cpu")
    return ext, info


def test_converted_extractor_equals_the_torchscript(extractor) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as tf_resize,
    )

    ext, info = extractor
    assert info["has_logits"] is False or info["source"] == "torch-fidelity"
    x = torch.randint(
        0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    ours = extract_features(x, ext)["pool"]
    ts_in = (tf_resize(x.float(), size=(299, 299), align_corners=False) - 128) / 128
    with torch.no_grad():
        ref = load_torchscript()(ts_in).numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.skipif(
    not FMNIST_TEST.is_file(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_fid_orders_real_halves_far_below_real_vs_noise(extractor) -> None:
    ext, _ = extractor
    with gzip.open(FMNIST_TEST) as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    real = torch.from_numpy(data[:64].copy())
    noise = torch.randint(
        0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    fa = extract_features(real[:32], ext)["pool"]
    fb = extract_features(real[32:], ext)["pool"]
    fn = extract_features(noise, ext)["pool"]
    same = M.fid(M.statistics(fa), M.statistics(fa))
    halves = M.fid(M.statistics(fa), M.statistics(fb))
    vs_noise = M.fid(M.statistics(fa), M.statistics(fn))
    assert abs(same) < 1e-3
    assert halves < 0.5 * vs_noise, (halves, vs_noise)


class _Lookup(torch.nn.Module):
    """A torchmetrics 'feature extractor' that returns precomputed features by index."""

    def __init__(self, feats: np.ndarray) -> None:
        super().__init__()
        self.feats = torch.from_numpy(feats).double()
        self.num_features = feats.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feats[x[:, 0, 0, 0].long()]


def test_fid_equals_torchmetrics_on_the_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 64))
    b = rng.normal(loc=0.3, scale=1.2, size=(250, 64)) @ rng.normal(size=(64, 64)) * 0.3
    feats = np.concatenate([a, b])
    tm = FrechetInceptionDistance(feature=_Lookup(feats), antialias=False).double()
    idx = torch.arange(len(feats))[:, None, None, None].expand(-1, 3, 1, 1).contiguous()
    tm.update(idx[:300].float(), real=True)
    tm.update(idx[300:].float(), real=False)
    ours = M.fid(M.statistics(a), M.statistics(b))
    assert abs(ours - tm.compute().item()) / abs(ours) < 1e-3


def _kid_numpy(x: np.ndarray, y: np.ndarray, subsets: int, size: int, seed: int) -> float:
    """Unbiased MMD^2, kernel (x.y/d + 1)^3, over the same subsets torch-fidelity draws."""
    rng = np.random.RandomState(seed)
    d = x.shape[1]
    vals = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), size, replace=False)]
        ys = y[rng.choice(len(y), size, replace=False)]
        kxx = (xs @ xs.T / d + 1) ** 3
        kyy = (ys @ ys.T / d + 1) ** 3
        kxy = (xs @ ys.T / d + 1) ** 3
        m = size
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(np.mean(vals))


def test_kid_equals_numpy_unbiased_estimator_and_caps_subset() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(80, 16)), rng.normal(0.2, 1.0, size=(60, 16))
    mean, _, size = M.kid(x, y, subset_size=1000, subsets=7, seed=3)
    assert size == 60  # capped at the smaller set
    assert mean == pytest.approx(_kid_numpy(x, y, 7, 60, 3), rel=1e-6)


def test_precision_recall_against_direct_knn() -> None:
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 5)), rng.normal(0.5, 1.0, size=(30, 5))
    k = 3

    def radii(f):
        dist = np.linalg.norm(f[:, None] - f[None], axis=-1)
        return np.sort(dist, axis=1)[:, k]  # k-th neighbour, itself at index 0

    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean((d_fr <= radii(real)[None]).any(1))
    recall = np.mean((d_fr.T <= radii(fake)[None]).any(1))
    p, r = M.precision_recall(real, fake, k)
    assert (p, r) == pytest.approx((precision, recall))


def test_too_few_images_is_a_clear_error() -> None:
    with pytest.raises(M.TooFewImagesError, match="at least 6"):
        M.precision_recall(np.zeros((4, 3)), np.zeros((10, 3)), k=5)


def _protocol(overall: int, per_split: int, per_class: int = 0, real=None) -> OmegaConf:
    return OmegaConf.create(
        {
            "overall": {"generated": overall, "real_per_class": real},
            "per_split": {"generated": per_split, "real_per_class": real},
            "per_class": {"generated": per_class, "real_per_class": real},
        }
    )


def test_protocol_counts_every_generated_image_in_its_label_split() -> None:
    splits = ["many"] * 33 + ["medium"] * 33 + ["few"] * 34
    comps = {c.name: c for c in comparisons(_protocol(50000, 20000), 100, splits, [500] * 100)}
    assert comps["overall"].generated == (500,) * 100
    for name in ("many", "medium", "few"):
        comp = comps[name]
        assert all(splits[c] == name for c in comp.classes)
        # Exactly the protocol's count, as balanced as it divides: 20000 = 33 * 606 + 2.
        assert comp.n_generated == 20000 and max(comp.generated) - min(comp.generated) <= 1
    assert comps["many"].generated[:3] == (607, 607, 606)
    assert comps["many"].classes == tuple(range(33))
    assert comps["few"].classes == tuple(range(66, 100))
    need = images_per_class(list(comps.values()), 100)
    assert need[0] == 607 and need[99] == 20000 // 34 + (33 < 20000 % 34)


def test_inaturalist_counts_are_exactly_the_protocols() -> None:
    # 8,142 classes: 50,000 // 8,142 * 8,142 = 48,852 and 20,000 // C * C fall short.
    counts = np.sort(np.random.default_rng(0).integers(2, 1000, 8142))[::-1]
    splits = ["many" if n > 100 else "few" if n < 20 else "medium" for n in counts]
    comps = comparisons(_protocol(50000, 20000), 8142, splits, [3] * 8142)
    assert [c.n_generated for c in comps] == [50000, 20000, 20000, 20000]
    assert all(max(c.generated) - min(c.generated) <= 1 for c in comps)
    assert comps[0].n_real == 3 * 8142


def test_an_unbalanced_reference_is_balanced_like_the_generated_images() -> None:
    # CelebA-HQ: 18,943 women, 11,057 men; generated 25k / 25k.
    protocol = _protocol(50000, 0, per_class=20000)
    comps = {c.name: c for c in comparisons(protocol, 2, ["many", "few"], [18943, 11057])}
    assert comps["overall"].real == (11057, 11057) and comps["overall"].generated == (25000,) * 2
    assert comps["class_000"].real == (18943,) and comps["class_001"].real == (11057,)
    assert real_images_per_class(list(comps.values())) == {0: 18943, 1: 11057}
    capped = comparisons(_protocol(100, 0, real=20), 2, ["many", "few"], [18943, 11057])
    assert capped[0].real == (20, 20)


def test_a_comparison_needing_fewer_real_images_takes_a_seeded_random_subset() -> None:
    from lt_diffusion.evaluation.evaluator import _real_of

    feats = {0: np.arange(100, dtype=np.float64)[:, None]}
    a = _real_of(feats, 0, 10, seed=0)
    assert len(a) == 10 and np.array_equal(a, _real_of(feats, 0, 10, seed=0))
    assert a.max() > 10  # not the first ten, which follow the file order
    assert np.array_equal(_real_of(feats, 0, 100, seed=0), feats[0])
