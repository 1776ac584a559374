"""Dataset sources: read a real dataset in its published on-disk format as uint8 arrays.

CIFAR-10 / CIFAR-100: torchvision's python pickles. Fashion-MNIST: the idx files (``.gz`` or
raw), found in the given root, torchvision's ``FashionMNIST/raw`` layout, or Debian's
``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import gzip
import pickle
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageArrays:
    """Images as uint8 ``(N, H, W, C)`` and int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


class Source(ABC):
    """A dataset in its published format."""

    name: str
    num_classes: int
    channels: int
    native_size: int
    class_names: list[str]

    def __init__(self, root: str | Path, download: bool = True) -> None:
        self.root = Path(root)
        self.download = download

    @abstractmethod
    def load(self, split: str) -> ImageArrays:
        """Load ``split`` ("train" or "test")."""

    def _check_split(self, split: str) -> None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")


def _try_download(fn, what: str, folder: Path) -> bool:
    """Run a torchvision download with a short timeout; False when the network says no."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        fn()
        return True
    except Exception as err:  # no network, DNS failure, HTTP errors: all mean "not here"
        print(f"Could not download {what} into {folder}: {type(err).__name__}: {err}")
        return False
    finally:
        socket.setdefaulttimeout(old)


def _missing(what: str, folder: Path, files: list[str], hint: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: expected {folder}/ with {', '.join(files)}. {hint} "
        "Or point paths.data_root (or dataset.source.root) at the folder that holds it."
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable CIFAR pickle ({type(err).__name__}): the file may be "
            "truncated; delete the folder and download it again"
        ) from err


def _key(d: dict, name: str):
    return d[name.encode()] if name.encode() in d else d[name]


class _CIFARSource(Source):
    folder: str
    train_files: list[str]
    test_files: list[str]
    meta_file: str
    label_key: str
    names_key: str
    url_dataset: str

    def _files_present(self) -> bool:
        d = self.root / self.folder
        return all((d / f).is_file() for f in [*self.train_files, *self.test_files, self.meta_file])

    def _ensure(self) -> Path:
        if not self._files_present() and self.download:
            import torchvision

            cls = getattr(torchvision.datasets, self.url_dataset)
            _try_download(
                lambda: cls(str(self.root), train=True, download=True), self.name, self.root
            )
        if not self._files_present():
            raise _missing(
                self.name,
                self.root / self.folder,
                [*self.train_files, *self.test_files, self.meta_file],
                "Download it on a machine with network access (dataset.source.download=true "
                "does this through torchvision) and copy it here.",
            )
        return self.root / self.folder

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        meta = _unpickle(self._ensure() / self.meta_file)
        return [n.decode() if isinstance(n, bytes) else n for n in _key(meta, self.names_key)]

    def load(self, split: str) -> ImageArrays:
        self._check_split(split)
        folder = self._ensure()
        images, labels = [], []
        for f in self.train_files if split == "train" else self.test_files:
            d = _unpickle(folder / f)
            data = np.asarray(_key(d, "data"), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / f}: expected rows of 3072 bytes, got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(_key(d, self.label_key), dtype=np.int64))
        return ImageArrays(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


class CIFAR10Source(_CIFARSource):
    name = "cifar10"
    num_classes = 10
    channels = 3
    native_size = 32
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    url_dataset = "CIFAR10"


class CIFAR100Source(_CIFARSource):
    name = "cifar100"
    num_classes = 100
    channels = 3
    native_size = 32
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    url_dataset = "CIFAR100"


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (uint8 data, big-endian header), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable idx file ({err}): download it again") from err
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of uint8 data (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values")
    return body.reshape(shape)


class FashionMNISTSource(Source):
    name = "fashion_mnist"
    num_classes = 10
    channels = 1
    native_size = 28
    class_names = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip
    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def _candidates(self) -> list[Path]:
        return [self.root, self.root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]

    def _find(self, stem: str) -> Path | None:
        for d in self._candidates():
            for name in (stem + ".gz", stem):
                if (d / name).is_file():
                    return d / name
        return None

    def load(self, split: str) -> ImageArrays:
        self._check_split(split)
        img_stem, lbl_stem = self.FILES[split]
        if (self._find(img_stem) is None or self._find(lbl_stem) is None) and self.download:
            import torchvision

            _try_download(
                lambda: torchvision.datasets.FashionMNIST(str(self.root), download=True),
                "Fashion-MNIST",
                self.root,
            )
        img, lbl = self._find(img_stem), self._find(lbl_stem)
        if img is None or lbl is None:
            raise _missing(
                "Fashion-MNIST",
                self.root,
                [f"{img_stem}.gz", f"{lbl_stem}.gz"],
                "On Debian: apt-get install dataset-fashion-mnist (files land in "
                f"{DEBIAN_FASHION_MNIST}).",
            )
        images, labels = read_idx(img), read_idx(lbl).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{img} and {lbl} disagree on the number of items")
        return ImageArrays(np.ascontiguousarray(images[..., None]), labels)
