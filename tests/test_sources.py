"""Sources read the published on-disk formats exactly."""

from __future__ import annotations

import gzip
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

from lt_diffusion.data import sources
from lt_diffusion.data.sources import CIFAR10Source, CIFAR100Source, FashionMNISTSource
from tests.fakedata import CIFAR10_NAMES, write_cifar10, write_cifar100, write_fashion_mnist


@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide this machine's Debian Fashion-MNIST so that only the test's files count."""
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


def assert_same(got: sources.ImageArrays, truth: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = truth
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, labels)


def test_cifar10_round_trip(tmp_path: Path) -> None:
    truth = write_cifar10(tmp_path, n_per_class=7, test_per_class=3, seed=4)
    src = CIFAR10Source(tmp_path, download=False)
    train = src.load("train")
    assert train.images.shape == (70, 32, 32, 3)
    assert_same(train, truth["train"])
    assert_same(src.load("test"), truth["test"])
    assert src.class_names == CIFAR10_NAMES
    # The (C, H, W) rows become (H, W, C): pixel (row 0, col 1) of image 0 is bytes 1, 1025, 2049.
    raw = np.asarray(sources._unpickle(tmp_path / "cifar-10-batches-py" / "data_batch_1")[b"data"])
    np.testing.assert_array_equal(train.images[0, 0, 1], raw[0, [1, 1025, 2049]])


def test_cifar100_round_trip_fine_labels(tmp_path: Path) -> None:
    truth = write_cifar100(tmp_path, n_per_class=2, test_per_class=1, seed=1)
    src = CIFAR100Source(tmp_path, download=False)
    assert_same(src.load("train"), truth["train"])
    assert_same(src.load("test"), truth["test"])
    assert src.load("train").labels.max() == 99  # fine labels, not the 20 coarse ones
    assert src.class_names[:2] == ["fine00", "fine01"] and len(src.class_names) == 100


@pytest.mark.parametrize("gz,layout", [(True, False), (False, False), (True, True)])
def test_fashion_mnist_round_trip(tmp_path: Path, no_debian: None, gz: bool, layout: bool) -> None:
    truth = write_fashion_mnist(tmp_path, 3, 2, seed=2, gz=gz, torchvision_layout=layout)
    src = FashionMNISTSource(tmp_path, download=False)
    got = src.load("train")
    assert got.images.shape == (30, 28, 28, 1)
    assert got.images.flags.writeable  # tensors made from it must not share read-only bytes
    assert_same(got, truth["train"])
    assert_same(src.load("test"), truth["test"])


def test_fashion_mnist_search_order(tmp_path: Path, no_debian: None) -> None:
    write_fashion_mnist(tmp_path, 1, 1, seed=0, torchvision_layout=True)
    flat = write_fashion_mnist(tmp_path, 2, 1, seed=9)  # root itself comes first
    assert_same(FashionMNISTSource(tmp_path, download=False).load("train"), flat["train"])


def test_missing_cifar_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        CIFAR10Source(tmp_path / "nowhere", download=False).load("train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "batches.meta" in msg and "paths.data_root" in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100Source(tmp_path, download=False).load("test")


def test_missing_fashion_mnist_names_every_place(tmp_path: Path, no_debian: None) -> None:
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTSource(tmp_path, download=False).load("train")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "no-debian" in msg and "paths.data_root" in msg


def test_failed_download_is_reported_with_a_short_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    seen = {}

    def offline(root: str, train: bool, download: bool) -> None:
        seen["timeout"] = socket.getdefaulttimeout()
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(FileNotFoundError, match="download failed.*Network is unreachable"):
        CIFAR10Source(tmp_path, download=True).load("train")
    assert seen["timeout"] == sources.DOWNLOAD_TIMEOUT_S <= 30
    assert socket.getdefaulttimeout() == before  # restored


def test_successful_download_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    truth = {}

    def fake_download(root: str, train: bool, download: bool) -> None:
        truth.update(write_cifar10(root, n_per_class=2, test_per_class=1))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    assert_same(CIFAR10Source(tmp_path, download=True).load("train"), truth["train"])


def test_truncated_cifar_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_per_class=2, test_per_class=1)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR pickle.*again"):
        CIFAR10Source(tmp_path, download=False).load("train")


def test_cifar_labels_out_of_range(tmp_path: Path) -> None:
    # A CIFAR-100 file under CIFAR-10's name: labels beyond 9.
    write_cifar100(tmp_path, n_per_class=1, test_per_class=1)
    write_cifar10(tmp_path, n_per_class=1, test_per_class=1)
    folder = tmp_path / "cifar-10-batches-py"
    d = sources._unpickle(tmp_path / "cifar-100-python" / "train")
    d[b"labels"] = d.pop(b"fine_labels")
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ValueError, match="labels range over 0..99 but cifar10 has 10 classes"):
        CIFAR10Source(tmp_path, download=False).load("test")


def test_truncated_and_bad_idx_files(tmp_path: Path, no_debian: None) -> None:
    write_fashion_mnist(tmp_path, 2, 1, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    with pytest.raises(ValueError, match="truncated or damaged"):
        FashionMNISTSource(tmp_path, download=False).load("train")
    path.write_bytes(b"\x00\x00\x0d\x03" + whole[4:])  # 0x0d: float data, not uint8
    with pytest.raises(ValueError, match="bad magic number"):
        FashionMNISTSource(tmp_path, download=False).load("train")
    # A truncated gzip stream.
    path.unlink()
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(whole)[:-40])
    with pytest.raises(ValueError, match="not a readable idx file.*download it again"):
        FashionMNISTSource(tmp_path, download=False).load("train")


def test_bad_split_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        CIFAR10Source(tmp_path, download=False).load("val")


@pytest.mark.skipif(
    not (sources.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"the real Fashion-MNIST is not installed at {sources.DEBIAN_FASHION_MNIST} "
    "(Debian package dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist(tmp_path: Path) -> None:
    src = FashionMNISTSource(tmp_path / "empty", download=False)  # falls back to Debian's copy
    train, test = src.load("train"), src.load("test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    # Published facts: the first labels (ankle boot, T-shirt, ...) and the pixel statistics
    # that torchvision users normalise with (mean 0.2860, std 0.3530).
    np.testing.assert_array_equal(train.labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    assert abs(train.images.mean() / 255 - 0.2860) < 5e-4
    assert abs(train.images.std() / 255 - 0.3530) < 5e-4
