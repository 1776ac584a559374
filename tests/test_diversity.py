"""Diversity metrics (lt_diffusion/evaluation/diversity.py) against direct computations:
density / coverage against a float64 double loop and the authors' ``prdc`` package, the Vendi
score against a float64 eigen-decomposition and its known cases, LPIPS diversity against the
``lpips`` package's own forward pass over every pair (on random trunk weights: what is checked
is our code, not the weights), and the evaluator's plumbing of the per-class LPIPS values."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import prdc
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lt_diffusion.evaluation import diversity as D
from lt_diffusion.evaluation import evaluator as E
from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.record import Entry
from tests.stand_ins import PooledPixels, stand_in_space

# ---------------------------------------------------------------------------- density, coverage


def _direct_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al. 2020, Eqs. 3-4, literally: loops in float64."""
    n, m = len(real), len(fake)
    radius = []
    for i in range(n):
        d = sorted(math.dist(real[i], real[j]) for j in range(n) if j != i)
        radius.append(d[k - 1])
    inside = [[math.dist(fake[j], real[i]) < radius[i] for i in range(n)] for j in range(m)]
    density = sum(map(sum, inside)) / (k * m)
    coverage = sum(any(inside[j][i] for j in range(m)) for i in range(n)) / n
    return density, coverage


def _sets(n: int, m: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(loc=0.3, scale=0.8, size=(m, d))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_density_coverage_equal_a_direct_double_loop(k: int) -> None:
    real, fake = _sets(40, 33, 6, seed=k)
    want = _direct_density_coverage(real, fake, k)
    assert D.density_coverage(real, fake, k) == pytest.approx(want, abs=1e-12)
    # Blocks of a few rows give the same counts as one block.
    assert D.density_coverage(real, fake, k, memory_budget=90) == pytest.approx(want, abs=1e-12)
    assert 0 < want[1] < 1 and want[0] > 0  # a case where neither is trivially 0 or 1


def test_density_coverage_equal_the_prdc_package() -> None:
    real, fake = _sets(120, 90, 16, seed=7)
    want = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    got = D.density_coverage(real, fake, 5)
    assert got == pytest.approx((want["density"], want["coverage"]), abs=1e-12)


def test_density_coverage_on_the_real_set_itself_and_a_far_set() -> None:
    real, _ = _sets(50, 1, 4, seed=1)
    # Every real point lies in its own ball: coverage 1, and density counts each own ball.
    density, coverage = D.density_coverage(real, real, 3)
    assert coverage == 1.0 and density >= 1 / 3
    assert D.density_coverage(real, real + 100.0, 3) == (0.0, 0.0)


def test_density_coverage_refuse_too_few_real_images() -> None:
    real, fake = _sets(3, 5, 4, seed=0)
    with pytest.raises(M.TooFewImagesError, match="k=3"):
        D.density_coverage(real, fake, 3)


# ---------------------------------------------------------------------------- Vendi


def _direct_vendi(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(x @ x.T / len(x))  # K / n, n x n, as the paper defines it
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


@pytest.mark.parametrize("n, d", [(20, 50), (80, 6)])  # n < d (Gram) and n > d (covariance)
def test_vendi_equals_a_float64_eigendecomposition_of_k_over_n(n: int, d: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, d)) + 0.5
    assert D.vendi_score(x) == pytest.approx(_direct_vendi(x), rel=1e-10)


def test_vendi_known_cases() -> None:
    row = np.random.default_rng(0).normal(size=(1, 8))
    assert D.vendi_score(np.repeat(row, 30, axis=0)) == pytest.approx(1.0, abs=1e-9)
    assert D.vendi_score(3.0 * np.eye(12)) == pytest.approx(12.0, rel=1e-12)
    # Two groups of identical samples, orthogonal to each other: two effective samples.
    two = np.concatenate([np.tile([1.0, 0, 0], (5, 1)), np.tile([0, 2.0, 0], (5, 1))])
    assert D.vendi_score(two) == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="all-zero"):
        D.vendi_score(np.zeros((3, 4)))


# ---------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips() -> nn.Module:
    """The lpips package's LPIPS(alex) with a random trunk and random non-negative linear
    layers (the published ones are >= 0 too): a distance network of the real structure."""
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about `pretrained=False`
        model = lpips.LPIPS(net="alex", pnet_rand=True, pretrained=False, verbose=False)
    with torch.no_grad():
        for lin in model.lins:
            lin.model[-1].weight.uniform_(0.0, 1.0)
    return model.eval()


def _pairs_direct(model: nn.Module, images: torch.Tensor, size: int | None = None) -> float:
    """Mean of the package's own LPIPS(x_i, x_j) over every pair i < j."""
    x = images.float() / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if size is not None:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        d = [
            float(model(x[i : i + 1], x[j : j + 1]))
            for i, j in itertools.combinations(range(len(x)), 2)
        ]
    return float(np.mean(d))


def _images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("channels, size, resize", [(3, 32, None), (1, 28, 40)])
def test_lpips_diversity_equals_the_packages_lpips_over_every_pair(
    random_lpips, channels: int, size: int, resize: int | None
) -> None:
    images = _images(7, channels, size)
    got = D.lpips_diversity(images, random_lpips, size=resize, batch_size=3)
    assert got == pytest.approx(_pairs_direct(random_lpips, images, resize), rel=1e-5)
    assert D.lpips_diversity(
        images[:1].repeat(5, 1, 1, 1), random_lpips, size=resize
    ) == pytest.approx(0.0, abs=1e-9)


def test_mean_pairwise_distance_equals_the_double_loop() -> None:
    e = np.random.default_rng(3).normal(size=(9, 5))
    pairs = [np.sum((e[i] - e[j]) ** 2) for i, j in itertools.combinations(range(9), 2)]
    assert D.mean_pairwise_sq_distance(e) == pytest.approx(np.mean(pairs), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        D.mean_pairwise_sq_distance(e[:1])


def test_images_too_small_for_alexnet_are_refused_with_the_setting(random_lpips) -> None:
    with pytest.raises(ValueError, match="eval.lpips_size=64"):
        D.check_lpips_size(random_lpips, 1, 28, None)
    D.check_lpips_size(random_lpips, 1, 28, 64)  # upsampled: fine
    D.check_lpips_size(random_lpips, 3, 32, None)


def _alexnet_file(tmp_path, name: str = "my-alexnet.pth") -> tuple[Any, nn.Module]:
    from torchvision.models import alexnet

    torch.manual_seed(1)
    net = alexnet(weights=None).eval()
    path = tmp_path / name
    torch.save(net.state_dict(), path)
    return path, net


def test_load_lpips_maps_torchvision_alexnet_onto_the_lpips_trunk(tmp_path, monkeypatch) -> None:
    path, net = _alexnet_file(tmp_path)
    monkeypatch.setenv(D.LPIPS_WEIGHTS_ENV, str(path))
    model, info = D.load_lpips("cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model.net(x)
        # relu1 .. relu5 are torchvision's features after layers 1, 4, 7, 9 and 11.
        for out, last in zip(outs, (1, 4, 7, 9, 11)):
            torch.testing.assert_close(out, net.features[: last + 1](x), rtol=0, atol=0)
    assert info["trunk_weights"] == path.name and len(info["trunk_weights_sha256"]) == 64
    assert all(bool((w >= 0).all()) for w in D._layer_weights(model))  # the shipped layers


def test_missing_or_corrupt_alexnet_weights_say_how_to_stage_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(D.LPIPS_WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(D.LPIPSWeightsError, match=D.LPIPS_WEIGHTS_ENV):
        D.alexnet_weights()
    monkeypatch.delenv(D.LPIPS_WEIGHTS_ENV)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(D.LPIPSWeightsError, match=rf"{D.ALEXNET_WEIGHTS_NAME}.*eval.metrics"):
        D.alexnet_weights()
    bad, _ = _alexnet_file(tmp_path, D.ALEXNET_WEIGHTS_NAME)  # right name, wrong content
    with pytest.raises(D.LPIPSWeightsError, match="corrupt"):
        D.load_lpips("cpu", bad)


def _staged() -> bool:
    try:
        D.alexnet_weights()
    except D.LPIPSWeightsError:
        return False
    return True


@pytest.mark.skipif(not _staged(), reason="AlexNet weights for LPIPS not staged (see docs)")
def test_staged_lpips_orders_a_copy_below_a_stranger() -> None:
    model, info = D.load_lpips("cpu")
    assert info["trunk_weights_sha256"].startswith(D.ALEXNET_SHA256_PREFIX)
    a = _images(1, seed=1)
    shifted = torch.roll(a, 1, dims=3)  # nearly the same image
    stranger = _images(1, seed=2)
    pairs = torch.cat([a, shifted, stranger])
    e = D.lpips_embeddings(pairs, model)
    near, far = np.sum((e[0] - e[1]) ** 2), np.sum((e[0] - e[2]) ** 2)
    assert 0 < near < far
    assert D.lpips_diversity(pairs, model) == pytest.approx(_pairs_direct(model, pairs), rel=1e-5)


# ---------------------------------------------------------------------------- the registry

SETTINGS = {"pr_k": 2, "lpips_images": 4, "seed": 0}


def test_registered_diversity_metrics_make_a_valid_record_entry() -> None:
    real, fake = _sets(12, 10, 5, seed=2)
    comparison = M.Comparison(
        real, fake, SETTINGS, extra={"lpips_per_class": [0.2, 0.4], "lpips_images": 3}
    )
    names = ["density", "coverage", "vendi", "lpips_diversity"]
    entry = M.compare(comparison, names)
    assert (entry["density"], entry["coverage"]) == pytest.approx(
        _direct_density_coverage(real, fake, 2)
    )
    assert entry["vendi"] == pytest.approx(_direct_vendi(fake))
    assert entry["vendi_real"] == pytest.approx(_direct_vendi(real))
    assert entry["lpips_diversity"] == pytest.approx(0.3) and entry["lpips_images"] == 3
    assert entry["notes"] == ["LPIPS diversity from 3 images per class (asked 4)"]
    Entry.model_validate(entry)
    assert {M.METRICS[n].better for n in names} == {"higher"}
    with pytest.raises(ValueError, match="lpips_images"):
        Entry.model_validate({k: v for k, v in entry.items() if k != "lpips_images"})
    with pytest.raises(ValueError, match="lpips_per_class"):
        M.compare(M.Comparison(real, fake, SETTINGS), ["lpips_diversity"])


# ---------------------------------------------------------------------------- the evaluator


def test_kept_images_are_the_first_of_each_class_whatever_the_ranks(monkeypatch) -> None:
    """Generation split over two simulated ranks keeps the same first images per class as one
    process: each image carries its global index in its pixels."""
    per_class, bs, keep = [5, 3, 4], 2, 2

    def fake_generate(model, sampler, labels, *, batch_size, rank, world_size, **kw):
        idx = torch.cat(
            [
                torch.arange(a, b)
                for a, b in E.chunk_ranges(len(labels), batch_size, rank, world_size)
            ]
        )
        return idx.to(torch.uint8)[:, None, None, None].expand(-1, 3, 8, 8).clone()

    monkeypatch.setattr(E, "generate", fake_generate)
    protocol = OmegaConf.create({"batch_size": bs, "seed": 0})
    model = nn.Module()
    model.in_channels, model.image_size = 3, 8

    def run() -> E.Generated:
        extractors = {"inception": PooledPixels()}
        return E.generated_features(model, None, per_class, protocol, 0.0, extractors, "cpu", keep)

    single = run()
    captured = {}

    def rank1(obj):
        captured[1] = obj
        raise StopIteration

    monkeypatch.setattr(E, "world", lambda: (1, 2))
    monkeypatch.setattr(E, "gather_objects", rank1)
    with pytest.raises(StopIteration):
        run()
    monkeypatch.setattr(E, "world", lambda: (0, 2))
    monkeypatch.setattr(E, "gather_objects", lambda obj: [obj, captured[1]])
    split = run()
    starts = np.cumsum([0, *per_class])
    for c in range(3):
        want = torch.arange(starts[c], starts[c] + keep)
        for gen in (single, split):
            assert gen.images[c][:, 0, 0, 0].tolist() == want.tolist()
            ours = gen.features["inception"][c]
            np.testing.assert_array_equal(ours, single.features["inception"][c])


class _Data:
    """The datamodule surface the evaluator reads: a balanced real reference set."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def reference_set(self, classes=None):
        if classes is None:
            return self.images, self.labels
        m = torch.isin(self.labels, torch.tensor(classes))
        return self.images[m], self.labels[m]

    def info(self) -> dict[str, Any]:
        return {"name": "toy", "class_names": ["a", "b", "c"], "image_size": 32, "channels": 3}


def test_the_record_holds_each_class_lpips_and_split_means(tmp_path, monkeypatch) -> None:
    """A folder of images evaluated with LPIPS on a random AlexNet file: each class entry is
    the package's own LPIPS averaged over the pairs of that class's first images, each split
    the mean over its classes."""
    path, _ = _alexnet_file(tmp_path)
    monkeypatch.setenv(D.LPIPS_WEIGHTS_ENV, str(path))
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    images = _images(len(labels), seed=5)
    real = _images(12, seed=6)
    protocol = OmegaConf.create(
        {
            "overall": {"generated": 9, "real_per_class": 4},
            "per_split": {"generated": 0},
            "per_class": {"generated": 4, "real_per_class": 4},
            "metrics": ["lpips_diversity", "vendi"],
            "lpips_images": 3,
            "lpips_size": None,
            "pr_k": 1,
            "batch_size": 4,
            "seed": 0,
        }
    )
    info = {"num_classes": 3, "splits": ["many", "medium", "few"], "image_size": 32, "channels": 3}
    out = E.run_protocol(
        protocol=protocol,
        dataset_info=info,
        datamodule=_Data(real, torch.arange(12) % 3),
        cache_dir=tmp_path / "cache",
        device=torch.device("cpu"),
        folder=(images, labels),
    )
    model, _ = D.load_lpips("cpu")
    per_class = {}
    for c in range(3):
        first = images[labels == c][:3]
        per_class[c] = _pairs_direct(model, first)
        entry = out["metrics"]["per_class"][f"class_{c:03d}"]
        assert entry["lpips_diversity"] == pytest.approx(per_class[c], rel=1e-5)
        assert entry["lpips_images"] == 3
    overall = out["metrics"]["overall"]
    assert overall["lpips_diversity"] == pytest.approx(np.mean(list(per_class.values())), rel=1e-5)
    assert out["extractors"]["lpips"]["trunk_weights"] == path.name


def test_lpips_settings_are_checked_before_any_work(tmp_path, monkeypatch) -> None:
    protocol = OmegaConf.create({"lpips_images": None})
    info = {"image_size": 32, "channels": 3}
    with pytest.raises(ValueError, match=r"\+eval.lpips_images=100"):
        E.prepare_lpips(protocol, info, [5, 5], torch.device("cpu"))
    protocol.lpips_images = 10
    with pytest.raises(M.TooFewImagesError, match="class 1 gets 1.*eval.overall.generated"):
        E.prepare_lpips(protocol, info, [5, 1], torch.device("cpu"))
    monkeypatch.setenv(D.LPIPS_WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(D.LPIPSWeightsError):
        E.prepare_lpips(protocol, info, [5, 5], torch.device("cpu"))
