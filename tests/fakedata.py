"""Write tiny datasets in their real published on-disk formats (for tests).

Every writer returns what it wrote: ``{"train": (images, labels), "test": (images, labels)}``
with uint8 images ``(N, H, W, C)`` in file order and int64 labels, so that tests can compare a
source's output with the truth. Images are random but class-dependent (the mean brightness
grows with the class index), and files are not sorted by class, as in the real ones.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def class_images(
    n_per_class: int | Sequence[int], num_classes: int, hw: int, channels: int, seed: int
) -> Arrays:
    """Random uint8 ``(N, hw, hw, channels)`` images whose mean depends on the class, shuffled."""
    rng = np.random.default_rng(seed)
    per_class = [int(n_per_class)] * num_classes if np.isscalar(n_per_class) else list(n_per_class)
    assert len(per_class) == num_classes, "one count per class"
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    base = (labels * (200 // max(1, num_classes - 1)))[:, None, None, None]
    noise = rng.integers(0, 56, size=(len(labels), hw, hw, channels))
    images = (base + noise).clip(0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def _pickle(path: Path, obj: dict) -> None:
    # The published pickles come from Python 2: protocol 2, bytes keys.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, 3072) rows of row-major (C, H, W) bytes, the CIFAR layout."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def write_cifar10(
    root: str | Path,
    n_per_class: int | Sequence[int] = 20,
    test_per_class: int = 4,
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/cifar-10-batches-py/``: data_batch_1..5, test_batch and batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = class_images(n_per_class, 10, 32, 3, seed)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _pickle(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels[part].tolist(),
                b"data": _cifar_rows(images[part]),
                b"filenames": [f"img_{j:05d}.png".encode() for j in part],
            },
        )
    timages, tlabels = class_images(test_per_class, 10, 32, 3, seed + 1)
    _pickle(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": tlabels.tolist(),
            b"data": _cifar_rows(timages),
            b"filenames": [f"test_{j:05d}.png".encode() for j in range(len(tlabels))],
        },
    )
    _pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": -(-len(labels) // 5),
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
        },
    )
    return {"train": (images, labels), "test": (timages, tlabels)}


def write_cifar100(
    root: str | Path,
    n_per_class: int | Sequence[int] = 5,
    test_per_class: int = 1,
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/cifar-100-python/``: train, test and meta (fine and coarse labels)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, s in (("train", n_per_class, seed), ("test", test_per_class, seed + 1)):
        images, labels = class_images(n, 100, 32, 3, s)
        _pickle(
            folder / split,
            {
                b"filenames": [f"{split}_{j:05d}.png".encode() for j in range(len(labels))],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": labels.tolist(),
                b"coarse_labels": (labels // 5).tolist(),
                b"data": _cifar_rows(images),
            },
        )
        out[split] = (images, labels)
    _pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{c:02d}".encode() for c in range(100)],
            b"coarse_label_names": [f"coarse{c:02d}".encode() for c in range(20)],
        },
    )
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """An idx file of uint8 data: magic 0x0000 08 <ndim>, big-endian int32 sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(
    root: str | Path,
    n_per_class: int | Sequence[int] = 10,
    test_per_class: int = 2,
    seed: int = 0,
    gz: bool = True,
    torchvision_layout: bool = False,
) -> dict[str, Arrays]:
    """idx files (magic 2051 images / 2049 labels) in ``root``, or in ``root/FashionMNIST/raw``
    when ``torchvision_layout``; ``.gz`` unless ``gz=False``."""
    folder = Path(root) / "FashionMNIST" / "raw" if torchvision_layout else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    out = {}
    for split, prefix, n, s in (
        ("train", "train", n_per_class, seed),
        ("test", "t10k", test_per_class, seed + 1),
    ):
        images, labels = class_images(n, 10, 28, 1, s)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images[..., 0], gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        out[split] = (images, labels)
    return out
