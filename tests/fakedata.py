"""Write tiny datasets in their real published on-disk formats (for tests)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def class_images(n_per_class: int, num_classes: int, hw: int, channels: int, seed: int):
    """Random uint8 images whose mean brightness depends on the class, grouped by class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    base = (labels * (200 // max(1, num_classes - 1)))[:, None, None, None]
    noise = rng.integers(0, 56, size=(len(labels), hw, hw, channels))
    images = (base + noise).clip(0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))  # real files are not sorted by class
    return images[order], labels[order]


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # row-major CHW bytes


def write_cifar10(root: str | Path, n_per_class: int = 20, test_per_class: int = 4, seed: int = 0):
    """``root/cifar-10-batches-py/`` with 5 train batches, test_batch and batches.meta."""
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
                b"filenames": [f"img_{j}.png".encode() for j in part],
            },
        )
    timg, tlbl = class_images(test_per_class, 10, 32, 3, seed + 1)
    _pickle(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": tlbl.tolist(),
            b"data": _cifar_rows(timg),
        },
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    _pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": len(labels) // 5,
            b"label_names": [n.encode() for n in names],
            b"num_vis": 3072,
        },
    )
    return images, labels


def write_cifar100(root: str | Path, n_per_class: int = 5, test_per_class: int = 1, seed: int = 0):
    """``root/cifar-100-python/`` with train, test and meta (fine and coarse labels)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_per_class, seed), ("test", test_per_class, seed + 1)):
        images, labels = class_images(n, 100, 32, 3, s)
        _pickle(
            folder / split,
            {
                b"filenames": [f"{split}_{j}.png".encode() for j in range(len(labels))],
                b"batch_label": split.encode(),
                b"fine_labels": labels.tolist(),
                b"coarse_labels": (labels // 5).tolist(),
                b"data": _cifar_rows(images),
            },
        )
    _pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
            b"coarse_label_names": [f"super{c:02d}".encode() for c in range(20)],
        },
    )


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(
    root: str | Path, n_per_class: int = 10, test_per_class: int = 2, seed: int = 0
):
    """idx ``.gz`` files (magic 2051 images / 2049 labels) in ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_per_class, seed), ("t10k", test_per_class, seed + 1)):
        images, labels = class_images(n, 10, 28, 1, s)
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
