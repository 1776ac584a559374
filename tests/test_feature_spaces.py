"""Feature spaces per metric (eval.features): torch-fidelity's DINOv2, VGG-16 and CLIP extractors
loaded from staged files, the refusal naming what to stage before anything is generated, the
evaluation's record and caches per space, FD_DINOv2 against a float64 computation.

The real weights cannot be downloaded here: the loaders run on small random networks staged in
the real layouts (a torch hub code folder for DINOv2, an OpenAI TorchScript archive for CLIP,
torchvision's VGG-16 state dict), and on the real weights when a user has staged them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from lt_diffusion.evaluation import evaluator as E
from lt_diffusion.evaluation import extractors as X
from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.inception import sha256
from lt_diffusion.evaluation.record import Entry
from tests.stand_ins import (
    PooledPixels,
    no_staged_weights,
    stage_small_clip,
    stage_small_dinov2,
    stand_in_space,
)

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _images(n: int, seed: int, channels: int = 3, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def _imagenet_input(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """torch-fidelity's input convention for its 224 px extractors, written out here."""
    x = x.expand(-1, 3, -1, -1).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
    mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
    return (x - mean) / (torch.tensor(std).view(1, 3, 1, 1) * 255)


def fd_float64(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two feature sets in float64 without a matrix square root: with
    centred features A, B, S1 S2 = A'A B'B / c has the non-zero eigenvalues of (A B')(A B')' / c,
    so tr sqrt(S1 S2) is the nuclear norm of A B' / sqrt(c), c = (n_a - 1)(n_b - 1)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    c = (len(a) - 1) * (len(b) - 1)
    root = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(c)
    traces = (ca**2).sum() / (len(a) - 1) + (cb**2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + traces - 2 * root)


def test_unstaged_spaces_are_refused_naming_each_file_and_where_it_goes(
    tmp_path: Path, monkeypatch
) -> None:
    hub = no_staged_weights(tmp_path, monkeypatch)
    with pytest.raises(X.FeatureWeightsError) as err:
        X.check_staged({"fd_dinov2": "dinov2", "precision": "vgg16", "recall": "vgg16"})
    text = str(err.value)
    for needed in (
        "fd_dinov2 need dinov2 features",
        "precision, recall need vgg16 features",
        f"{hub}/{X.DINOV2_REPO_NAME}",
        f"{hub}/checkpoints/{X.DINOV2_WEIGHTS_NAME}",
        f"{hub}/checkpoints/{X.VGG16_WEIGHTS_NAME}",
        X.DINOV2_WEIGHTS_ENV,
        "torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')",
        "leave these metrics out of eval.metrics",
    ):
        assert needed in text, needed
    X.check_staged({"fid": "inception"})  # Inception is converted offline: always available
    with pytest.raises(X.FeatureWeightsError, match="CLIP ViT-B/32 is not staged"):
        X.load("clip")


def _protocol(**changes) -> OmegaConf:
    base = {
        "overall": {"generated": 12, "real_per_class": 6},
        "per_split": {"generated": 0},
        "per_class": {"generated": 4, "real_per_class": 6},
        "metrics": ["fid", "kid", "recall"],
        "kid_subset_size": 4,
        "kid_subsets": 3,
        "pr_k": 2,
        "batch_size": 5,
        "seed": 0,
        "require_is": False,
    }
    return OmegaConf.create({**base, **changes})


class _Data:
    """The datamodule surface the evaluator reads: a balanced real reference set."""

    def __init__(self, n_per_class: int = 6, seed: int = 1) -> None:
        self.images = _images(3 * n_per_class, seed)
        self.labels = torch.arange(3 * n_per_class) % 3

    def reference_set(self, classes=None):
        if classes is None:
            return self.images, self.labels
        keep = torch.isin(self.labels, torch.tensor(classes))
        return self.images[keep], self.labels[keep]

    def info(self) -> dict:
        return {
            "name": "tiny", "class_names": ["a", "b", "c"], "image_size": 28, "channels": 3,
            "num_classes": 3, "splits": ["many", "medium", "few"], "profile": "exp",
        }  # fmt: skip


INFO = {"num_classes": 3, "splits": ["many", "medium", "few"], "image_size": 28, "channels": 3}


def test_metrics_are_refused_before_any_generation_when_their_weights_are_not_staged(
    tmp_path: Path, monkeypatch
) -> None:
    """No model, no sampler: a refusal after generation had started would be another error."""
    no_staged_weights(tmp_path, monkeypatch)
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    run = dict(
        dataset_info=INFO, datamodule=_Data(), cache_dir=tmp_path, device=torch.device("cpu")
    )
    with pytest.raises(X.FeatureWeightsError, match=r"recall need vgg16 features.*vgg16-"):
        E.run_protocol(protocol=_protocol(features={"recall": "vgg16"}), **run)
    with pytest.raises(X.FeatureWeightsError, match="fd_dinov2 need dinov2"):
        E.run_protocol(protocol=_protocol(metrics=["fid", "fd_dinov2"]), **run)
    with pytest.raises(ValueError, match="FID is computed on inception features by definition"):
        E.run_protocol(protocol=_protocol(features={"fid": "dinov2"}), **run)
    with pytest.raises(ValueError, match="unknown feature space 'dino'"):
        E.run_protocol(protocol=_protocol(features={"kid": "dino"}), **run)
    with pytest.raises(ValueError, match="unknown metrics"):
        E.run_protocol(protocol=_protocol(features={"recal": "vgg16"}), **run)


def test_dinov2_loads_through_torch_fidelitys_extractor_from_the_staged_layout(
    tmp_path: Path, monkeypatch
) -> None:
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    repo, weights = stage_small_dinov2(tmp_path, monkeypatch)
    extractor, info = X.load("dinov2")
    assert type(extractor) is FeatureExtractorDinoV2 and not extractor.training
    assert info["weights_sha256"] == sha256(weights) and info["code"] == str(repo)
    assert (info["name"], info["layer"], info["dim"]) == ("dinov2-vit-l-14", "dinov2", 1024)
    gray = _images(5, seed=2, channels=1)
    ours = extract_features(gray, extractor, batch_size=2)["pool"]
    net = torch.hub.load(str(repo), "dinov2_vitl14", source="local", pretrained=False)
    net.load_state_dict(torch.load(weights))
    x = _imagenet_input(gray, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    np.testing.assert_allclose(ours, net(x).double().detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clip_loads_the_staged_torchscript_archive_through_torch_fidelity(
    tmp_path: Path, monkeypatch
) -> None:
    path = stage_small_clip(tmp_path, monkeypatch)
    extractor, info = X.load("clip")
    assert info["weights_sha256"] == sha256(path) and info["dim"] == 512
    assert extract_features(_images(3, seed=4), extractor)["pool"].shape == (3, 512)
    (tmp_path / "broken.pt").write_bytes(b"not an archive")
    monkeypatch.setenv(X.CLIP_WEIGHTS_ENV, str(tmp_path / "broken.pt"))
    with pytest.raises(X.FeatureWeightsError, match="not a CLIP TorchScript archive"):
        X.load("clip")


@pytest.mark.slow
def test_vgg16_loads_torchvisions_state_dict_through_torch_fidelity(
    tmp_path: Path, monkeypatch
) -> None:
    """A randomly initialised VGG-16 (138M parameters: about 10 s) saved as torchvision saves
    its weights; the features are fc2 after ReLU."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().eval()
    path = tmp_path / "vgg16-random.pth"
    torch.save(vgg.state_dict(), path)
    monkeypatch.setenv(X.VGG16_WEIGHTS_ENV, str(path))
    extractor, info = X.load("vgg16")
    assert info["weights_sha256"] == sha256(path) and info["layer"] == "fc2_relu"
    x = _images(2, seed=5)
    ours = extract_features(x, extractor)["pool"]
    with torch.no_grad():
        inp = _imagenet_input(x, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        h = torch.flatten(vgg.avgpool(vgg.features(inp)), 1)
        fc2 = torch.relu(vgg.classifier[3](torch.relu(vgg.classifier[0](h))))
    assert ours.shape == (2, 4096)
    np.testing.assert_allclose(ours, fc2.double().numpy(), rtol=1e-4, atol=1e-5)


class _Projected(nn.Module):
    """A stand-in DINOv2: 4x4-pooled pixels through a fixed random projection to 24 features
    (torch-fidelity's DINOv2 layer name). Small: a 1024-d matrix square root costs seconds."""

    features_list = ("dinov2",)

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(48, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        pooled = nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)
        return (torch.tanh(pooled @ self.w),)


def test_fd_dinov2_record_fields_and_caches_per_extractor(tmp_path: Path, monkeypatch) -> None:
    """A folder of images under a protocol with FD on DINOv2 and KID on DINOv2 beside FID on
    Inception (small stand-ins of both: the loaders are tested above): each value equals a
    float64 computation on its space's features, the record names each extractor and its
    weights, and the real features are cached once per extractor."""
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    stand_in_space(monkeypatch, _Projected(), dim=24, space="dinov2")
    labels = torch.arange(15) % 3
    images = _images(15, seed=3)
    data = _Data()
    protocol = _protocol(metrics=["fid", "fd_dinov2", "kid"], features={"kid": "dinov2"})
    out = E.run_protocol(
        protocol=protocol, dataset_info=INFO, datamodule=data, cache_dir=tmp_path / "cache",
        device=torch.device("cpu"), folder=(images, labels),
    )  # fmt: skip
    first = torch.cat([torch.nonzero(labels == c).flatten()[:4] for c in range(3)])
    by_class = torch.cat([data.reference_set([c])[0] for c in range(3)])  # the evaluator's order
    for net, space, fd in (
        (_Projected(), "dinov2", "fd_dinov2"),
        (PooledPixels(), "inception", "fid"),
    ):
        fake, real = (extract_features(x, net)["pool"] for x in (images[first], by_class))
        overall = out["metrics"]["overall"]
        assert overall[fd] == pytest.approx(fd_float64(real, fake), rel=1e-6), space
        if space == "dinov2":  # KID on DINOv2, as the protocol asks
            assert overall["kid"] == pytest.approx(M.kid(real, fake, 4, 3, 0).mean, rel=1e-6)
        entry = out["metrics"]["per_class"]
        fake1 = extract_features(images[labels == 1][:4], net)["pool"]
        real1 = extract_features(data.reference_set([1])[0], net)["pool"]
        assert entry["class_001"][fd] == pytest.approx(fd_float64(real1, fake1), rel=1e-6)
    assert out["protocol"]["features"] == {
        "fid": "inception",
        "fd_dinov2": "dinov2",
        "kid": "dinov2",
    }
    assert set(out["extractors"]) == {"inception", "dinov2"}
    assert out["extractors"]["dinov2"]["name"] == "dinov2-vit-l-14"
    assert out["extractors"]["dinov2"]["layer"] == "dinov2"
    Entry.model_validate(out["metrics"]["overall"])
    cached = sorted((tmp_path / "cache" / "real_features").iterdir())
    assert len(cached) == 2 * 3  # each class once per extractor
    keys = [str(np.load(f)["key"]) for f in cached]
    assert sum('"name":"dinov2-vit-l-14"' in k for k in keys) == 3
    assert sum('"name":"inception-v3-compat"' in k for k in keys) == 3


def test_an_extractor_of_another_width_than_its_space_is_refused(tmp_path: Path, monkeypatch):
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    stand_in_space(monkeypatch, _Projected(dim=7), dim=24, space="dinov2")
    with pytest.raises(X.FeatureWeightsError, match=r"dinov2 extractor gives \[7\]-dimensional"):
        E.run_protocol(
            protocol=_protocol(metrics=["fid", "fd_dinov2"]), dataset_info=INFO,
            datamodule=_Data(), cache_dir=tmp_path, device=torch.device("cpu"),
            folder=(_images(15, seed=3), torch.arange(15) % 3),
        )  # fmt: skip


def test_an_optional_metric_without_weights_is_reported_unavailable_with_the_instruction(
    tmp_path: Path, monkeypatch
) -> None:
    no_staged_weights(tmp_path, monkeypatch)
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    protocol = _protocol(metrics=["fid", "fd_dinov2"], optional_metrics=["fd_dinov2"])
    out = E.run_protocol(
        protocol=protocol, dataset_info=INFO, datamodule=_Data(), cache_dir=tmp_path / "cache",
        device=torch.device("cpu"), folder=(_images(15, seed=3), torch.arange(15) % 3),
    )  # fmt: skip
    entry = out["metrics"]["per_class"]["class_002"]
    assert entry["fd_dinov2"] is None and X.DINOV2_WEIGHTS_NAME in entry["fd_dinov2_unavailable"]
    assert entry["fid"] > 0 and set(out["extractors"]) == {"inception"}
    Entry.model_validate(entry)


def _staged_or_skip(space: str) -> None:
    why = X.SPACES[space].missing()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("space", ["dinov2", "vgg16", "clip"])
def test_the_staged_real_weights_separate_real_images_from_noise(space: str) -> None:
    """On the user's staged weights: features of the stated dimension, and FD between two
    halves of real Fashion-MNIST far below FD between real images and noise."""
    _staged_or_skip(space)
    if not FMNIST_TEST.is_file():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    import gzip

    with gzip.open(FMNIST_TEST) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16)[: 24 * 784]
    real = torch.from_numpy(raw.copy()).view(24, 1, 28, 28)
    extractor, info = X.load(space)
    a = extract_features(real[:12], extractor)["pool"]
    b = extract_features(real[12:], extractor)["pool"]
    noise = extract_features(_images(12, seed=0, channels=1), extractor)["pool"]
    assert a.shape == (12, info["dim"]) and np.isfinite(a).all()
    assert M.fid(M.statistics(a), M.statistics(b)) < M.fid(M.statistics(a), M.statistics(noise))
