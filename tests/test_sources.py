"""Sources read the published on-disk formats exactly."""

from __future__ import annotations

import gzip
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

from lt_diffusion.data import sources
from lt_diffusion.data.sources import CIFAR10Source, CIFAR100Source, FashionMNISTSource
from tests.conftest import ROOT
from tests.fakedata import (
    CIFAR10_NAMES,
    python2_pickle,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
)


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
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
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


def test_fashion_mnist_without_the_system_copy_reads_only_its_root(tmp_path: Path) -> None:
    # The system-wide copy (here a folder of the test's files) is read when the root lacks
    # the files, and the source says so; with system_copy=False (a root given explicitly) the
    # root's absence is an error naming it, whatever is installed elsewhere.
    system = tmp_path / "system"
    truth = write_fashion_mnist(system, 1, 1, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "DEBIAN_FASHION_MNIST", system)
        src = FashionMNISTSource(tmp_path / "given", download=False)
        assert_same(src.load("train"), truth["train"])
        assert src.location == system
        with pytest.raises(FileNotFoundError) as err:
            FashionMNISTSource(tmp_path / "given", download=False, system_copy=False).load("test")
    assert str(tmp_path / "given") in str(err.value) and str(system) not in str(err.value)
    write_fashion_mnist(tmp_path / "given", 1, 1, seed=4, torchvision_layout=True)
    src = FashionMNISTSource(tmp_path / "given", download=False, system_copy=False)
    src.load("test")
    assert src.location == tmp_path / "given" / "FashionMNIST" / "raw"
    assert CIFAR10Source(tmp_path / "c").location == tmp_path / "c" / "cifar-10-batches-py"


def test_failed_download_is_reported_with_a_short_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import utils

    seen = {}

    def offline(url: str, download_root: str, filename: str, md5: str) -> None:
        seen.update(timeout=socket.getdefaulttimeout(), url=url, md5=md5)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(FileNotFoundError, match="download failed.*Network is unreachable"):
        CIFAR10Source(tmp_path, download=True).load("train")
    assert seen["timeout"] == sources.DOWNLOAD_TIMEOUT_S <= 30
    assert socket.getdefaulttimeout() == before  # restored
    # torchvision's archive and its published sum (the archive is checked before unpacking)
    assert seen["url"].endswith("cifar-10-python.tar.gz")
    assert seen["md5"] == "c58f30108f718f92721af3b95e74349a"


def test_successful_download_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import utils

    truth = {}

    def fake_download(url: str, download_root: str, filename: str, md5: str) -> None:
        truth.update(write_cifar10(download_root, n_per_class=2, test_per_class=1))

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    assert_same(CIFAR10Source(tmp_path, download=True).load("train"), truth["train"])


def test_tiny_pickles_are_in_the_python2_format(tmp_path: Path) -> None:
    """The writer's pickles read as the published ones do: str keys under torchvision's
    ``encoding="latin1"``, bytes keys under ``encoding="bytes"``."""
    write_cifar10(tmp_path, n_per_class=1, test_per_class=1)
    path = tmp_path / "cifar-10-batches-py" / "batches.meta"
    for encoding, key in (("latin1", "label_names"), ("bytes", b"label_names")):
        with open(path, "rb") as f:
            assert key in pickle.load(f, encoding=encoding)


def _as_release(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make torchvision's published MD5 sums those of the tiny files in ``folder``."""
    from torchvision.datasets.cifar import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    for attr in ("train_list", "test_list"):
        files = [[f, calculate_md5(folder / f)] for f, _ in getattr(CIFAR10, attr)]
        monkeypatch.setattr(CIFAR10, attr, files)


def test_a_damaged_file_of_the_release_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = write_cifar10(tmp_path, n_per_class=2, test_per_class=1)
    folder = tmp_path / "cifar-10-batches-py"
    _as_release(monkeypatch, folder)
    assert_same(CIFAR10Source(tmp_path, download=False).load("train"), truth["train"])
    # One flipped pixel: the pickle still parses, only the sum shows it.
    path = folder / "data_batch_4"
    data = bytearray(path.read_bytes())
    data[-200] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"data_batch_4 differ from the published CIFAR-10") as e:
        CIFAR10Source(tmp_path, download=False).load("test")
    assert "data_batch_1" not in str(e.value) and "download it again" in str(e.value)


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
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"labels"] = d.pop(b"fine_labels")
    python2_pickle(folder / "test_batch", d)
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


REAL_CIFAR10 = Path(os.environ.get("LT_DIFFUSION_DATA", ROOT / "data")) / "cifar10"


@pytest.mark.skipif(
    not (REAL_CIFAR10 / "cifar-10-batches-py" / "data_batch_1").is_file(),
    reason=f"the real CIFAR-10 is not at {REAL_CIFAR10} ($LT_DIFFUSION_DATA/cifar10)",
)
def test_real_cifar10_is_verified_and_read() -> None:
    src = CIFAR10Source(REAL_CIFAR10, download=False)
    train = src.load("train")
    assert src._verified and train.images.shape == (50000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(train.labels), [5000] * 10)
    assert src.class_names == CIFAR10_NAMES
    # Published facts: the first labels (frog, truck, truck, deer, automobile) and the mean.
    np.testing.assert_array_equal(train.labels[:5], [6, 9, 9, 4, 1])
    assert abs(train.images.mean() / 255 - 0.4734) < 5e-4
