"""Sources of the fine-grained text-to-image datasets (the CM paper, Table G.11, Sec. G.9):
images, class labels and the text descriptions of Reed et al. (CVPR 2016) that accompany them,
read in their published layouts.

* CUB-200-2011: ``CUB_200_2011/images/<NNN.Class_name>/<file>.jpg`` with ``images.txt``
  (``<id> <relpath>``), ``image_class_labels.txt`` (``<id> <class 1..200>``),
  ``train_test_split.txt`` (``<id> <1 train | 0 test>``) and ``classes.txt``
  (``<class> <NNN.Class_name>``); captions ``cvpr2016_cub/text_c10/<NNN.Class_name>/<file>.txt``.
* Oxford-102 flowers: ``jpg/image_00001.jpg ...``, ``imagelabels.mat`` (``labels``, 1..102) and
  ``setid.mat`` (``trnid``, ``valid``, ``tstid``: image ids); captions
  ``cvpr2016_flowers/text_c10/class_00001/image_00001.txt``.

A caption file holds one description per line (ten in the release). ``split="train"`` is each
dataset's official per-image training split over *all* classes (CUB: ``train_test_split.txt``;
Oxford-102: ``trnid`` and ``valid``, 20 per class), not Reed et al.'s class-disjoint
text-to-image split that VQ-Diffusion trains on: a class-imbalance study evaluates per class, so
every class must be in training (docs/datasets.md). The balanced reference set is that training
split before the long-tail construction, as for CIFAR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lt_diffusion.data.paper_sources import _ImageFileSource
from lt_diffusion.data.sources import _missing


def read_captions(path: Path) -> tuple[str, ...]:
    """The non-empty lines of a caption file, stripped; an error naming the file when it is
    missing or holds none."""
    if not path.is_file():
        raise FileNotFoundError(
            f"caption file {path} is missing: unpack Reed et al.'s captions (text_c10/) for every "
            "image, or fix paths.data_root"
        )
    lines = tuple(s.strip() for s in path.read_text(encoding="utf-8", errors="replace").split("\n"))
    captions = tuple(s for s in lines if s)
    if not captions:
        raise ValueError(f"caption file {path} holds no caption: download the captions again")
    return captions


class _CaptionedSource(_ImageFileSource):
    """An image-file source whose images come with captions: :meth:`captions` gives them in the
    order of :meth:`load` (``listing``)."""

    def caption_files(self, split: str) -> list[Path]:  # pragma: no cover - per dataset
        """The caption file of every image of ``split``, in listing order."""
        raise NotImplementedError

    def captions(self, split: str) -> list[tuple[str, ...]]:
        """The captions of every image of ``split``, in the order :meth:`load` gives them."""
        if split not in self.splits:
            raise ValueError(f"{self.name} has the splits {self.splits}, not {split!r}")
        return [read_captions(p) for p in self.caption_files(split)]


def _table(path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of ``columns`` fields (blank lines skipped)."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise ValueError(f"{path}:{i + 1}: expected {columns} fields, got {line!r}")
        rows.append(parts)
    return rows


class CUB200Source(_CaptionedSource):
    """CUB-200-2011: 200 bird species, 11,788 images (5,994 train / 5,794 test, 29-30
    training images per class), ten captions per image."""

    name = "cub200"
    num_classes = 200
    reference_split = "train"
    FOLDER = "CUB_200_2011"
    CAPTIONS = "cvpr2016_cub/text_c10"
    LISTS = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows: tuple[list[str], np.ndarray, np.ndarray, list[str]] | None = None

    def _read(self) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
        """Relative paths, 0-based labels and train flags by image id; class folder names."""
        if self._rows is not None:
            return self._rows
        base = self.root / self.FOLDER
        if not all((base / f).is_file() for f in self.LISTS):
            layout = [*self.LISTS, "images/<NNN.Class_name>/*.jpg"]
            hint = (
                "Unpack CUB_200_2011.tgz there, and Reed et al.'s captions (cvpr2016_cub) next "
                "to it."
            )
            raise _missing("CUB-200-2011", base, layout, hint, None)
        paths = dict(_table(base / "images.txt", 2))
        labels = dict(_table(base / "image_class_labels.txt", 2))
        train = dict(_table(base / "train_test_split.txt", 2))
        classes = _table(base / "classes.txt", 2)
        if not set(paths) == set(labels) == set(train):
            raise ValueError(
                f"{base}: images.txt, image_class_labels.txt and train_test_split.txt list "
                "different image ids: the lists do not belong together; download them again"
            )
        if [int(c) for c, _ in classes] != list(range(1, self.num_classes + 1)):
            raise ValueError(
                f"{base / 'classes.txt'} does not list classes 1..{self.num_classes} in order "
                f"(dataset.num_classes={self.num_classes})"
            )
        ids = sorted(paths, key=int)
        rows = (
            [paths[i] for i in ids],
            np.asarray([int(labels[i]) - 1 for i in ids], dtype=np.int64),
            np.asarray([train[i] == "1" for i in ids]),
            [name for _, name in classes],
        )
        self._rows = rows
        return rows

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """Species names without the ``NNN.`` prefix (``Black_footed_Albatross``)."""
        return [folder.split(".", 1)[-1] for folder in self._read()[3]]

    def _select(self, split: str) -> np.ndarray:
        return self._read()[2] if split == "train" else ~self._read()[2]

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        paths, labels, _, _ = self._read()
        keep = self._select(split)
        files = [f"{self.FOLDER}/images/{p}" for p, k in zip(paths, keep) if k]
        return files, labels[keep]

    def caption_files(self, split: str) -> list[Path]:
        paths, _, _, _ = self._read()
        keep = self._select(split)
        base = self.root / self.CAPTIONS
        return [base / Path(p).with_suffix(".txt") for p, k in zip(paths, keep) if k]


class Oxford102Source(_CaptionedSource):
    """Oxford-102 flowers: 102 categories, 8,189 images; ``train`` = ``trnid`` + ``valid``
    (10 + 10 per class), ``test`` = ``tstid`` (6,149); ten captions per image. The release
    names no categories: class ``c`` is ``class_<c + 1:05d>``, the captions' folder name."""

    name = "oxford102"
    num_classes = 102
    reference_split = "train"
    IMAGES = "jpg"
    CAPTIONS = "cvpr2016_flowers/text_c10"
    LABELS, SETID = "imagelabels.mat", "setid.mat"
    SPLIT_KEYS = {"train": ("trnid", "valid"), "test": ("tstid",)}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mats: tuple[np.ndarray, dict[str, np.ndarray]] | None = None

    def _read(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """1-based labels of images 1..N; the image ids of each split, sorted."""
        if self._mats is not None:
            return self._mats
        from scipy.io import loadmat

        if not (self.root / self.LABELS).is_file() or not (self.root / self.SETID).is_file():
            layout = [self.LABELS, self.SETID, f"{self.IMAGES}/image_00001.jpg ..."]
            hint = (
                "Unpack 102flowers.tgz there with imagelabels.mat and setid.mat, and Reed et "
                "al.'s captions (cvpr2016_flowers) next to them."
            )
            raise _missing("Oxford-102 flowers", self.root, layout, hint, None)
        try:
            labels = np.asarray(loadmat(self.root / self.LABELS)["labels"]).ravel()
            setid = loadmat(self.root / self.SETID)
            ids = {k: np.sort(np.asarray(setid[k]).ravel().astype(np.int64)) for k in
                   ("trnid", "valid", "tstid")}  # fmt: skip
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(
                f"{self.root}: {self.LABELS} / {self.SETID} are not the Oxford-102 MATLAB files "
                f"(labels; trnid, valid, tstid): {err}"
            ) from err
        every = np.concatenate(list(ids.values()))
        if every.min() < 1 or every.max() > len(labels):
            raise ValueError(
                f"{self.root / self.SETID} names image ids up to {every.max()} but "
                f"{self.LABELS} labels {len(labels)} images: the files do not belong together"
            )
        self._mats = (labels.astype(np.int64), ids)
        return self._mats

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return [f"class_{c + 1:05d}" for c in range(self.num_classes)]

    def _ids(self, split: str) -> np.ndarray:
        _, ids = self._read()
        return np.sort(np.concatenate([ids[k] for k in self.SPLIT_KEYS[split]]))

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        labels, _ = self._read()
        ids = self._ids(split)
        return [f"{self.IMAGES}/image_{i:05d}.jpg" for i in ids], labels[ids - 1] - 1

    def caption_files(self, split: str) -> list[Path]:
        labels, _ = self._read()
        base = self.root / self.CAPTIONS
        return [
            base / f"class_{labels[i - 1]:05d}" / f"image_{i:05d}.txt" for i in self._ids(split)
        ]
