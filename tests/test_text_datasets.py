"""The fine-grained text-to-image datasets of CM paper Table G.11: the CUB-200-2011 and
Oxford-102 readers on tiny files in their published layouts (ids, labels, splits, each image's
captions), the long-tailed subset keeping every image's captions, and the caption rows the
training stream serves."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_diffusion.data.datamodule import LongTailDataModule
from lt_diffusion.data.longtail import longtail_counts
from lt_diffusion.data.text_sources import CUB200Source, Oxford102Source
from tests import fakedata

CLASS_OF = re.compile(r"class (\d+) image (\d+)")


def _class_and_image(caption: str) -> tuple[int, int]:
    c, k = CLASS_OF.search(caption).groups()
    return int(c), int(k)


def _brightness_class(images: np.ndarray, num_classes: int) -> np.ndarray:
    """The class the fake images' brightness encodes (base = class * 200 // (C - 1) + noise)."""
    step = 200 // (num_classes - 1)
    return np.rint((images.reshape(len(images), -1).mean(1) - 27.5) / step).astype(int)


# -- readers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["cub200", "oxford102"])
def test_readers_give_ids_labels_splits_and_each_images_captions(
    dataset: str, tmp_path: Path
) -> None:
    if dataset == "cub200":
        truth = fakedata.write_cub200(tmp_path, n_per_class=[5, 4, 3], test_per_class=2)
        source = CUB200Source(tmp_path, image_size=16, num_classes=3)
    else:
        truth = fakedata.write_oxford102(tmp_path, train_per_class=4, test_counts=[2, 3, 1])
        source = Oxford102Source(tmp_path, image_size=16, num_classes=3)
    for split in ("train", "test"):
        arrays, captions = source.load(split), source.captions(split)
        _, labels, written = truth[split]
        np.testing.assert_array_equal(arrays.labels, labels)  # order: image id, as written
        assert [list(c) for c in captions] == written  # ten lines each, matched by image
        assert all(len(c) == fakedata.CAPTIONS_PER_IMAGE for c in captions)
        assert [_class_and_image(c[0])[0] for c in captions] == labels.tolist()
        np.testing.assert_array_equal(_brightness_class(arrays.images, 3), labels)
    assert len(source.load("train").labels) == (12 if dataset == "cub200" else 12)
    names = source.class_names
    assert names == (["Bird_0", "Bird_1", "Bird_2"] if dataset == "cub200" else
                     ["class_00001", "class_00002", "class_00003"])  # fmt: skip


def test_oxford_train_split_is_trnid_and_valid(tmp_path: Path) -> None:
    from scipy.io import loadmat

    fakedata.write_oxford102(tmp_path, train_per_class=4, test_counts=2)
    setid = loadmat(tmp_path / "setid.mat")
    files, _ = Oxford102Source(tmp_path, image_size=16, num_classes=3).listing("train")
    want = np.sort(np.concatenate([setid["trnid"].ravel(), setid["valid"].ravel()]))
    assert files == [f"jpg/image_{i:05d}.jpg" for i in want]


@pytest.mark.parametrize("dataset", ["cub200", "oxford102"])
def test_readers_name_what_is_missing(dataset: str, tmp_path: Path) -> None:
    cls = CUB200Source if dataset == "cub200" else Oxford102Source
    with pytest.raises(FileNotFoundError, match="paths.data_root"):
        cls(tmp_path, image_size=16, num_classes=3).load("train")
    writer = fakedata.write_cub200 if dataset == "cub200" else fakedata.write_oxford102
    writer(tmp_path)
    victim = next((tmp_path / ("cvpr2016_cub" if dataset == "cub200" else
                               "cvpr2016_flowers")).rglob("*.txt"))  # fmt: skip
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"caption file {re.escape(str(victim))}"):
        cls(tmp_path, image_size=16, num_classes=3).captions("train")


# -- the long-tailed subset and its captions --------------------------------------------------
def test_long_tail_keeps_each_images_captions_and_the_stream_serves_one_of_them(
    tmp_path: Path,
) -> None:
    fakedata.write_cub200(tmp_path, n_per_class=30, test_per_class=1, num_classes=3)
    dm = LongTailDataModule(
        CUB200Source(tmp_path, image_size=16, num_classes=3), image_size=16, num_classes=3,
        channels=3, ratio=10, batch_size=16, hflip=False,
    )  # fmt: skip
    dm.setup()
    assert dm.class_counts == longtail_counts("exp", 30, 3, 10) == [30, 9, 3]
    assert len(dm.train_captions) == 42
    # Every kept image keeps its own ten captions (the caption names its class and image).
    for label, captions in zip(dm.train_labels.tolist(), dm.train_captions):
        assert {_class_and_image(c) for c in captions} == {_class_and_image(captions[0])}
        assert _class_and_image(captions[0])[0] == label
    table, classes = dm.caption_table()
    assert len(table) == 420 and classes.tolist() == np.repeat(dm.train_labels, 10).tolist()
    batches = iter(dm.train_dataloader())
    seen = set()
    for _ in range(20):
        x, y, rows = next(batches)
        assert rows.shape == y.shape
        for label, row in zip(y.tolist(), rows.tolist()):
            assert classes[row] == label  # a caption of the sample's own image ...
            seen.add(row)
    assert len(seen) > 200  # ... drawn among its ten, not always the first
    # ... and the same rows again for the same seed and batch (resume-safe).
    again = next(iter(dm.train_dataloader()))
    first = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(again[2], first[2])


def test_stream_pairs_each_image_with_its_own_captions(tmp_path: Path) -> None:
    """The image served and the caption row served belong to the same training image."""
    fakedata.write_cub200(tmp_path, n_per_class=[6, 6, 6], test_per_class=1, num_classes=3)
    dm = LongTailDataModule(
        CUB200Source(tmp_path, image_size=16, num_classes=3), image_size=16, num_classes=3,
        channels=3, ratio=1, batch_size=8, hflip=False,
    )  # fmt: skip
    dm.setup()
    table, _ = dm.caption_table()
    pixels = {dm.train_images[i].float().mean().item(): i for i in range(len(dm.train_images))}
    x, _, rows = next(iter(dm.train_dataloader()))
    for image, row in zip(x, rows.tolist()):
        i = pixels[((image + 1) * 127.5).round().mean().item()]
        assert table[row] in dm.train_captions[i]
