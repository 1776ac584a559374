"""Dataset sources: read a real dataset in its published on-disk format as uint8 arrays.

CIFAR-10 / CIFAR-100: the python pickles (``cifar-10-batches-py``, ``cifar-100-python``),
read by torchvision's CIFAR datasets. Fashion-MNIST: the idx files (``.gz`` or raw), found in
the given root, torchvision's ``FashionMNIST/raw`` layout, or Debian's
``dataset-fashion-mnist`` package, read with NumPy (torchvision's reader takes only unpacked
files in ``root/FashionMNIST/raw``; Debian ships ``.gz`` files in its own folder). No PIL
round trip: a load takes well under a second.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass
class ImageArrays:
    """Images as uint8 ``(N, H, W, C)`` and int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class VectorArrays:
    """Points as float32 ``(N, D)`` and int64 labels ``(N,)``: data that are not images (the
    synthetic benchmark, :mod:`lt_diffusion.data.toy`), served to the model as they are."""

    points: np.ndarray
    labels: np.ndarray


class Source(ABC):
    """A dataset in its published format.

    ``reference_split`` names the split whose images are the balanced real reference for
    evaluation: the training split for datasets made long-tailed by a profile (CBDM / OC / CM
    compare against the full balanced CIFAR training set). ``data_kind`` is ``"image"``
    (:meth:`load` gives :class:`ImageArrays`) or ``"vector"`` (:class:`VectorArrays`, with
    ``channels`` the number of coordinates).
    """

    name: str
    num_classes: int
    channels: int
    native_size: int
    class_names: list[str]
    reference_split: str = "train"
    data_kind: str = "image"

    def __init__(self, root: str | Path, download: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.download = bool(download)

    @abstractmethod
    def load(self, split: str) -> ImageArrays | VectorArrays:
        """Load ``split`` ("train" or "test") as uint8 images (or float points) and int64
        labels."""

    @property
    def location(self) -> Path | None:
        """The folder the data are read from (after :meth:`load`, the one it read); None for
        generated data."""
        return getattr(self, "root", None)

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


def _unreadable(paths: list[Path]) -> list[Path]:
    """The files among ``paths`` that do not unpickle. torchvision's error does not say which
    file it was reading: after a failed read this names the broken one."""
    bad = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                pickle.load(f, encoding="latin1")
        except Exception:  # truncated, not a pickle, unreadable: all "broken"
            bad.append(path)
    return bad


@cache
def _without_sums(release: type) -> type:
    """torchvision's CIFAR class with its MD5 sums set to None, so that its own checks test
    presence only (``check_integrity(path, None)``); :meth:`_CIFARSource._verify` decides
    about the sums."""
    return type(
        release.__name__,
        (release,),
        {
            "train_list": [[f, None] for f, _ in release.train_list],
            "test_list": [[f, None] for f, _ in release.test_list],
            "meta": {**release.meta, "md5": None},
        },
    )


class _CIFARSource(Source):
    """CIFAR through torchvision's ``CIFAR10`` / ``CIFAR100``: their file lists, MD5 sums,
    download and pickle reader.

    Before reading, every file must be present (the error lists them). The published release
    is recognised by its sums: where some data files match torchvision's MD5 sums and others
    do not, those others are damaged and named. A folder where no data file matches is a copy
    in the release's format (a re-pickled subset, the tests' tiny files): it is read without
    sums, and a file that does not parse is named then (docs/datasets.md).
    """

    torchvision_name: str
    display: str

    def __init__(self, root: str | Path, download: bool = True) -> None:
        super().__init__(root, download)
        self._names: list[str] | None = None
        self._verified = False

    @property
    def release(self) -> type:
        """torchvision's dataset class of this release (file names, sums, URL)."""
        from torchvision.datasets import cifar

        return getattr(cifar, self.torchvision_name)

    @property
    def folder(self) -> Path:
        return self.root / self.release.base_folder

    @property
    def location(self) -> Path:
        return self.folder

    def _files(self, split: str | None = None) -> list[str]:
        """The data files of ``split``, or every file of the release (data, then meta)."""
        lists = {"train": self.release.train_list, "test": self.release.test_list}
        data = [name for s in ([split] if split else SPLIT_NAMES) for name, _ in lists[s]]
        return data if split else [*data, self.release.meta["filename"]]

    def _present(self) -> bool:
        return all((self.folder / f).is_file() for f in self._files())

    def _ensure(self) -> Path:
        error = None
        if not self._present() and self.download:
            from torchvision.datasets import utils

            r = self.release
            error = _try_download(
                lambda: utils.download_and_extract_archive(
                    r.url, str(self.root), filename=r.filename, md5=r.tgz_md5
                )
            )
        if not self._present():
            raise _missing(
                self.display,
                self.folder,
                self._files(),
                "Download it on a machine with network access (dataset.source.download=true "
                "does this through torchvision) and copy the folder here.",
                error,
            )
        self._verify()
        return self.folder

    def _verify(self) -> None:
        if self._verified:
            return
        from torchvision.datasets.utils import check_integrity

        sums = dict([*self.release.train_list, *self.release.test_list])
        differ = [f for f, md5 in sums.items() if not check_integrity(self.folder / f, md5)]
        if 0 < len(differ) < len(sums):
            raise ValueError(
                f"{self.folder}: {', '.join(differ)} differ from the published {self.display} "
                "release (torchvision's MD5 sums) while its other files match: they are "
                "damaged. Delete the folder and download it again."
            )
        self._verified = True

    def _read(self, split: str) -> Any:
        """torchvision's dataset of ``split``: ``data`` (N, 32, 32, 3), ``targets``, ``classes``."""
        folder = self._ensure()
        try:
            return _without_sums(self.release)(str(self.root), train=split == "train")
        except Exception as err:  # pickle, key and shape errors: name the file when one is broken
            files = [folder / f for f in (*self._files(split), self.release.meta["filename"])]
            bad = _unreadable(files)
            raise ValueError(
                f"{', '.join(map(str, bad or files))} is not a readable CIFAR pickle "
                f"({type(err).__name__}: {err}): the file is probably truncated or not "
                f"{self.display}; delete its folder and download it again"
            ) from err

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        if self._names is None:
            self.load("test")  # the smaller split; every split's dataset carries the names
        assert self._names is not None
        return self._names

    def load(self, split: str) -> ImageArrays:
        self._check_split(split)
        ds = self._read(split)
        labels = self._check_labels(np.asarray(ds.targets), self.folder)
        if len(labels) != len(ds.data) or len(ds.classes) != self.num_classes:
            raise ValueError(
                f"{self.folder}: the {split} files hold {len(ds.data)} images, {len(labels)} "
                f"labels and {len(ds.classes)} class names ({self.display} has "
                f"{self.num_classes}): download it again"
            )
        self._names = [str(n) for n in ds.classes]
        return ImageArrays(np.ascontiguousarray(ds.data, dtype=np.uint8), labels)


class CIFAR10Source(_CIFARSource):
    """CIFAR-10 from ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta)."""

    name = "cifar10"
    display = "CIFAR-10"
    num_classes = 10
    channels = 3
    native_size = 32
    torchvision_name = "CIFAR10"


class CIFAR100Source(_CIFARSource):
    """CIFAR-100 (fine labels) from ``root/cifar-100-python/`` (train, test, meta)."""

    name = "cifar100"
    display = "CIFAR-100"
    num_classes = 100
    channels = 3
    native_size = 32
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
    """Fashion-MNIST from idx files: ``root``, ``root/FashionMNIST/raw``, then (``system_copy``)
    Debian's copy. ``system_copy=False`` when a root was given explicitly: its files, or an
    error naming it."""

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

    def __init__(self, root: str | Path, download: bool = True, system_copy: bool = True) -> None:
        super().__init__(root, download)
        self.system_copy = bool(system_copy)
        self._read_from: Path | None = None

    @property
    def location(self) -> Path:
        return self._read_from or self.root

    def candidates(self) -> list[Path]:
        """Folders searched, in order."""
        system = [DEBIAN_FASHION_MNIST] if self.system_copy else []
        return [self.root, self.root / "FashionMNIST" / "raw", *system]

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
            system = (
                f" and {DEBIAN_FASHION_MNIST} (Debian: apt-get install dataset-fashion-mnist)"
                if self.system_copy
                else ""
            )
            raise _missing(
                "Fashion-MNIST",
                self.root,
                [f"{stem}.gz" for stem in self.FILES[split]],
                f"Also searched {self.root / 'FashionMNIST' / 'raw'}{system}. "
                "Download the files on a machine with network access and copy them here.",
                error,
            )
        img, lbl = found
        self._read_from = img.parent
        if img.parent == DEBIAN_FASHION_MNIST:
            log.info(f"Fashion-MNIST: no idx files in {self.root}, read {DEBIAN_FASHION_MNIST}")
        images = read_idx(img, ndim=3)
        labels = self._check_labels(read_idx(lbl, ndim=1), lbl)
        if len(images) != len(labels):
            raise ValueError(
                f"{img} has {len(images)} images but {lbl} has {len(labels)} labels: the two "
                "files do not belong together; download them again"
            )
        return ImageArrays(np.ascontiguousarray(images[..., None]), labels)
