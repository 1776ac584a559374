"""Sources of the CM paper's image-file datasets, read in their published layouts and served
from a one-time preprocessed copy (:mod:`lt_diffusion.data.prepare`) at the configured size.

* CelebA-HQ (CelebAMask-HQ release): ``CelebA-HQ-img/<idx>.jpg`` and
  ``CelebAMask-HQ-attribute-anno.txt`` (CelebA's attribute format); classes Female / Male from
  the ``Male`` attribute. One split; the long tail comes from the imbalance profile.
* ImageNet-LT (Liu et al. 2019): the split lists ``ImageNet_LT_{train,test}.txt`` (lines
  ``train/n01440764/n01440764_10026.JPEG 0``) over an ImageNet folder; its own long tail.
* iNaturalist 2018: ``train2018.json`` / ``val2018.json`` (COCO-style) over the image folder
  ``train_val2018/``; its own long tail.
* ArtBench-10 (ImageFolder release): ``artbench-10-imagefolder-split/{train,test}/<style>/``.

``split="test"`` is each dataset's balanced held-out set where it has one (ImageNet-LT's test
list, 50 per class; iNaturalist's val2018, 3 per class; ArtBench-10's test folder).
``reference_split`` is the balanced real set the metrics compare against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lt_diffusion.data.prepare import prepared_copy
from lt_diffusion.data.sources import ImageArrays, Source, _missing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


class _ImageFileSource(Source):
    """A dataset of image files listed per split; subclasses implement :meth:`listing`."""

    channels = 3
    splits: tuple[str, ...] = ("train", "test")

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        num_classes: int | None = None,
        download: bool = False,
    ) -> None:
        super().__init__(root, download=False)  # no dataset here is downloadable by script
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.image_size = self.native_size = int(image_size)
        if num_classes is not None:  # datasets whose configs may use fewer classes (tests)
            self.num_classes = int(num_classes)

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:  # pragma: no cover
        """Image paths relative to the root, and their labels."""
        raise NotImplementedError

    def load(self, split: str) -> ImageArrays:
        if split not in self.splits:
            raise ValueError(f"{self.name} has the splits {self.splits}, not {split!r}")
        files, labels = self.listing(split)
        labels = self._check_labels(labels, self.root)
        images, labels = prepared_copy(self.root, self.name, split, files, labels, self.image_size)
        return ImageArrays(images=images, labels=labels)


class CelebAHQSource(_ImageFileSource):
    """CelebA-HQ (30,000 faces), classes ``female`` (0) / ``male`` (1) from ``Male``."""

    name = "celeba_hq"
    num_classes = 2
    class_names = ["female", "male"]
    splits = ("train",)
    reference_split = "train"
    ATTRIBUTES = "CelebAMask-HQ-attribute-anno.txt"
    IMAGES = "CelebA-HQ-img"

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        anno, folder = self.root / self.ATTRIBUTES, self.root / self.IMAGES
        if not anno.is_file() or not folder.is_dir():
            layout = [f"{self.IMAGES}/<idx>.jpg", self.ATTRIBUTES]
            hint = "Get the CelebAMask-HQ release (it holds both) and unpack it there."
            raise _missing("CelebA-HQ", self.root, layout, hint, None)
        lines = anno.read_text().split("\n")
        try:
            n = int(lines[0].split()[0])
            names = lines[1].split()
            male = names.index("Male")
        except (IndexError, ValueError) as err:
            raise ValueError(f"{anno} is not a CelebA attribute file (count, names, rows)") from err
        files, labels = [], []
        for line in lines[2 : 2 + n]:
            parts = line.split()
            if len(parts) != len(names) + 1:
                raise ValueError(f"{anno}: row {line[:40]!r} has not {len(names)} attribute values")
            files.append(f"{self.IMAGES}/{parts[0]}")
            labels.append(1 if parts[1 + male] == "1" else 0)
        if len(files) != n:
            raise ValueError(f"{anno} announces {n} images but lists {len(files)}: truncated file")
        return files, np.asarray(labels, dtype=np.int64)


class ImageNetLTSource(_ImageFileSource):
    """ImageNet-LT: 1000 classes, 115,846 training images (1280 .. 5 per class)."""

    name = "imagenet_lt"
    reference_split = "test"
    LISTS = {"train": "ImageNet_LT_train.txt", "test": "ImageNet_LT_test.txt"}

    num_classes = 1000
    _names: list[str] | None = None

    def _read_list(self, split: str) -> tuple[list[str], np.ndarray]:
        path = self.root / self.LISTS[split]
        if not path.is_file():
            layout = [*self.LISTS.values(), "train/<wnid>/*.JPEG", "val/..."]
            hint = "Put the ImageNet-LT split lists next to the ImageNet folders they name."
            raise _missing("ImageNet-LT", self.root, layout, hint, None)
        files, labels = [], []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rel, label = line.rsplit(maxsplit=1)
                labels.append(int(label))
            except ValueError as err:
                raise ValueError(
                    f"{path}:{i + 1}: expected '<path> <label>', got {line!r}"
                ) from err
            files.append(rel)
        return files, np.asarray(labels, dtype=np.int64)

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """WordNet ids, read from the training list's folders (``train/<wnid>/...``)."""
        if self._names is None:
            files, labels = self._read_list("train")
            names = [f"class_{c:04d}" for c in range(self.num_classes)]
            for f, c in zip(files, labels):
                parts = Path(f).parts
                if 0 <= c < self.num_classes and len(parts) >= 2:
                    names[c] = parts[-2]
            self._names = names
        return self._names

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        return self._read_list(split)


class INaturalistSource(_ImageFileSource):
    """iNaturalist 2018: 8,142 species, ~437k training images (IR about 500)."""

    name = "inaturalist"
    reference_split = "test"
    JSONS = {"train": "train2018.json", "test": "val2018.json"}

    num_classes = 8142

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: dict[str, tuple[list[str], np.ndarray, list[str]]] = {}

    def _read(self, split: str) -> tuple[list[str], np.ndarray, list[str]]:
        if split not in self._cache:
            path = self.root / self.JSONS[split]
            if not path.is_file():
                layout = [*self.JSONS.values(), "train_val2018/..."]
                hint = "Unpack the official 2018 annotations and images there."
                raise _missing("iNaturalist 2018", self.root, layout, hint, None)
            data = json.loads(path.read_text())
            try:
                cats = sorted(data["categories"], key=lambda c: c["id"])
                index = {c["id"]: i for i, c in enumerate(cats)}
                file_of = {im["id"]: im["file_name"] for im in data["images"]}
                pairs = [
                    (file_of[a["image_id"]], index[a["category_id"]]) for a in data["annotations"]
                ]
            except (KeyError, TypeError) as err:
                raise ValueError(
                    f"{path} is not a COCO-style iNaturalist annotation file ({err})"
                ) from err
            names = [str(c.get("name", c["id"])) for c in cats]
            files = [p[0] for p in pairs]
            self._cache[split] = (files, np.asarray([p[1] for p in pairs], dtype=np.int64), names)
        return self._cache[split]

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self._read("train")[2]

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        files, labels, _ = self._read(split)
        return files, labels


class ArtBench10Source(_ImageFileSource):
    """ArtBench-10: 10 styles, 5,000 training and 1,000 test images each."""

    name = "artbench10"
    num_classes = 10
    class_names = [
        "art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism",
        "realism", "renaissance", "romanticism", "surrealism", "ukiyo_e",
    ]  # fmt: skip
    reference_split = "train"  # balanced, as for CIFAR: the full training set
    FOLDER = "artbench-10-imagefolder-split"

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        base = self.root / self.FOLDER / split
        missing = [s for s in self.class_names if not (base / s).is_dir()]
        if missing:
            layout = [f"{split}/{s}/*.jpg" for s in missing[:2]] + ["..."]
            hint = "Get the ImageFolder release (artbench-10-imagefolder-split.tar), unpack it."
            raise _missing("ArtBench-10", self.root / self.FOLDER, layout, hint, None)
        files, labels = [], []
        for c, style in enumerate(self.class_names):
            for f in sorted((base / style).iterdir()):
                if f.suffix in IMAGE_SUFFIXES:
                    files.append(str(f.relative_to(self.root)))
                    labels.append(c)
        return files, np.asarray(labels, dtype=np.int64)
