"""Dataset sources: read a real dataset in its published on-disk format as uint8 arrays.

CIFAR-10 / CIFAR-100: the python pickles torchvision downloads (``cifar-10-batches-py``,
``cifar-100-python``). Fashion-MNIST: the idx files (``.gz`` or raw), found in the given root,
torchvision's ``FashionMNIST/raw`` layout, or Debian's ``dataset-fashion-mnist`` package.
Everything is read with NumPy directly (no PIL round trip), so a load takes well under a
second.
"""

from __future__ import annotations

import gzip
import pickle
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass
class ImageArrays:
    """Images as uint8 ``(N, H, W, C)`` and int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


class Source(ABC):
    """A dataset in its published format.

    ``reference_split`` names the split whose images are the balanced real reference for
    evaluation: the training split for datasets made long-tailed by a profile (CBDM / OC / CM
    compare against the full balanced CIFAR training set).
    """

    name: str
    num_classes: int
    channels: int
    native_size: int
    class_names: list[str]
    reference_split: str = "train"

    def __init__(self, root: str | Path, download: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.download = bool(download)

    @abstractmethod
    def load(self, split: str) -> ImageArrays:
        """Load ``split`` ("train" or "test") as uint8 images and int64 labels."""

    def _check_split(self, split: str) -> None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")

    def _check_labels(self, labels: np.ndarray, where: Path) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"{where}: labels range over {labels.min()}..{labels.max()} but {self.name} has "
                f"{self.num_classes} classes: the file is not {self.name} or is damaged; "
                "download it again"
            )
        return labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, download={self.download})"


def _try_download(fn: Callable[[], Any]) -> str | None:
    """Run a torchvision download with a short socket timeout; the error text, or None."""
    old = socket.getdefaulttimeout()
    # Compute nodes often have no network: fail in seconds, not after the OS's minutes.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fn()
        return None
    except Exception as err:  # no network, DNS failure, HTTP or checksum errors: "not here"
        return f"{type(err).__name__}: {err}"
    finally:
        socket.setdefaulttimeout(old)


def _missing(
    what: str, folder: Path, files: list[str], hint: str, download_error: str | None
) -> FileNotFoundError:
    tried = f" The download failed ({download_error})." if download_error else ""
    return FileNotFoundError(
        f"{what} not found: expected the folder {folder}/ holding {', '.join(files)}.{tried} "
        f"{hint} Then point paths.data_root (or dataset.source.root) at the folder that holds "
        "it."
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err}): the file is "
            "probably truncated; delete its folder and download it again"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dictionary")
    return obj


def _key(d: dict, name: str, path: Path) -> Any:
    # torchvision's pickles have bytes keys (encoding="bytes"); accept str keys too.
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ValueError(f"{path} has no {name!r} entry: not a CIFAR file; download it again")


class _CIFARSource(Source):
    folder: str
    train_files: list[str]
    test_files: list[str]
    meta_file: str
    label_key: str
    names_key: str
    torchvision_name: str
    display: str

    def __init__(self, root: str | Path, download: bool = True) -> None:
        super().__init__(root, download)
        self._names: list[str] | None = None

    def _all_files(self) -> list[str]:
        return [*self.train_files, *self.test_files, self.meta_file]

    def _present(self, folder: Path) -> bool:
        return all((folder / f).is_file() for f in self._all_files())

    def _ensure(self) -> Path:
        folder = self.root / self.folder
        error = None
        if not self._present(folder) and self.download:
            import torchvision

            cls = getattr(torchvision.datasets, self.torchvision_name)
            error = _try_download(lambda: cls(str(self.root), train=True, download=True))
        if not self._present(folder):
            raise _missing(
                self.display,
                folder,
                self._all_files(),
                "Download it on a machine with network access (dataset.source.download=true "
                "does this through torchvision) and copy the folder here.",
                error,
            )
        return folder

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        if self._names is None:
            path = self._ensure() / self.meta_file
            names = [
                n.decode() if isinstance(n, bytes) else str(n)
                for n in _key(_unpickle(path), self.names_key, path)
            ]
            if len(names) != self.num_classes:
                raise ValueError(
                    f"{path} lists {len(names)} class names, {self.display} has "
                    f"{self.num_classes}: download it again"
                )
            self._names = names
        return self._names

    def load(self, split: str) -> ImageArrays:
        self._check_split(split)
        folder = self._ensure()
        images, labels = [], []
        for f in self.train_files if split == "train" else self.test_files:
            path = folder / f
            d = _unpickle(path)
            data = np.asarray(_key(d, "data", path), dtype=np.uint8)
            lbl = self._check_labels(np.asarray(_key(d, self.label_key, path)), path)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lbl) != len(data):
                raise ValueError(
                    f"{path}: expected N rows of 3072 bytes and N labels, got data "
                    f"{data.shape} and {len(lbl)} labels: download it again"
                )
            # Rows are row-major (C, H, W) bytes; the sources' contract is (N, H, W, C).
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(lbl)
        return ImageArrays(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


class CIFAR10Source(_CIFARSource):
    """CIFAR-10 from ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta)."""

    name = "cifar10"
    display = "CIFAR-10"
    num_classes = 10
    channels = 3
    native_size = 32
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    torchvision_name = "CIFAR10"


class CIFAR100Source(_CIFARSource):
    """CIFAR-100 (fine labels) from ``root/cifar-100-python/`` (train, test, meta)."""

    name = "cifar100"
    display = "CIFAR-100"
    num_classes = 100
    channels = 3
    native_size = 32
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    torchvision_name = "CIFAR100"


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Read an idx file of uint8 data (big-endian header), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(
            f"{path} is not a readable idx file ({type(err).__name__}: {err}): the file is "
            "probably truncated; download it again"
        ) from err
    # Magic: two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions.
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of uint8 data (bad magic number)")
    if ndim is not None and data[3] != ndim:
        raise ValueError(f"{path}: expected an idx file of {ndim} dimensions, got {data[3]}")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path} is truncated inside its header: download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3]))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path} holds {len(data) - header} values where its header announces {expected} "
            f"{shape}: the file is truncated or damaged; download it again"
        )
    # A copy: frombuffer's view is read-only, and torch tensors made from it would share that.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


class FashionMNISTSource(Source):
    """Fashion-MNIST from idx files: ``root``, ``root/FashionMNIST/raw``, then Debian's copy."""

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

    def candidates(self) -> list[Path]:
        """Folders searched, in order."""
        return [self.root, self.root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]

    @staticmethod
    def _file(folder: Path, stem: str) -> Path | None:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
        return None

    def _find(self, split: str) -> tuple[Path, Path] | None:
        # Images and labels must come from the same folder, never one from each.
        for folder in self.candidates():
            img, lbl = (self._file(folder, stem) for stem in self.FILES[split])
            if img is not None and lbl is not None:
                return img, lbl
        return None

    def load(self, split: str) -> ImageArrays:
        self._check_split(split)
        found, error = self._find(split), None
        if found is None and self.download:
            import torchvision

            error = _try_download(
                lambda: torchvision.datasets.FashionMNIST(str(self.root), download=True)
            )
            found = self._find(split)
        if found is None:
            raise _missing(
                "Fashion-MNIST",
                self.root,
                [f"{stem}.gz" for stem in self.FILES[split]],
                f"Also searched {self.root / 'FashionMNIST' / 'raw'} and "
                f"{DEBIAN_FASHION_MNIST} (Debian: apt-get install dataset-fashion-mnist). "
                "Download the files on a machine with network access and copy them here.",
                error,
            )
        img, lbl = found
        images = read_idx(img, ndim=3)
        labels = self._check_labels(read_idx(lbl, ndim=1), lbl)
        if len(images) != len(labels):
            raise ValueError(
                f"{img} has {len(images)} images but {lbl} has {len(labels)} labels: the two "
                "files do not belong together; download them again"
            )
        return ImageArrays(np.ascontiguousarray(images[..., None]), labels)
