"""The CM paper's image-file datasets (CelebA-HQ, ImageNet-LT, iNaturalist 2018, ArtBench-10):
read in their published layouts, served from one prepared copy, made long-tailed as the paper
does."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from lt_diffusion import prepare_data
from lt_diffusion.data import LongTailDataModule, longtail_counts
from lt_diffusion.data import prepare as prepare_module
from lt_diffusion.data.paper_sources import (
    ArtBench10Source,
    CelebAHQSource,
    ImageNetLTSource,
    INaturalistSource,
)
from lt_diffusion.data.prepare import prepared_root
from tests.conftest import compose_config
from tests.fakedata import (
    ARTBENCH_STYLES,
    write_artbench10,
    write_celeba_hq,
    write_imagenet_lt,
    write_inaturalist,
)


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def copies(root: Path) -> list[Path]:
    """The prepared copies (and leftovers) of the dataset at ``root``; lock files aside."""
    folder = prepared_root(root)
    found = sorted(folder.iterdir()) if folder.is_dir() else []
    return [p for p in found if p.suffix != ".lock"]


def datamodule(source, image_size: int, num_classes: int, **kw) -> LongTailDataModule:
    return LongTailDataModule(source, image_size, num_classes, 3, hflip=False, **kw)


def test_celeba_hq_classes_from_the_male_attribute_and_centre_crop(tmp_path: Path) -> None:
    male = [0, 1, 0, 0, 1, 0, 0]
    write_celeba_hq(tmp_path, male, hw=(40, 56))  # landscape: the crop drops 8 columns a side
    src = CelebAHQSource(tmp_path, image_size=40)
    arrays = src.load("train")
    np.testing.assert_array_equal(arrays.labels, male)
    assert arrays.images.shape == (7, 40, 40, 3) and arrays.images.dtype == np.uint8
    for i in (0, 4):  # no resize at this size: exactly the centre square of the decoded file
        full = decoded(tmp_path / "CelebA-HQ-img" / f"{i}.jpg")
        np.testing.assert_array_equal(arrays.images[i], full[:, 8:48])
    assert src.class_names == ["female", "male"]
    with pytest.raises(ValueError, match="splits"):
        src.load("test")  # CelebA-HQ has one split; the long tail comes from the profile


def test_resize_is_antialiased_bicubic(tmp_path: Path) -> None:
    """PIL's bicubic shrink agrees with torch's antialiased bicubic (a second implementation)."""
    write_artbench10(tmp_path, n_per_class=1, test_per_class=0, hw=(64, 64))
    arrays = ArtBench10Source(tmp_path, image_size=32).load("train")
    files = sorted((tmp_path / "artbench-10-imagefolder-split" / "train").rglob("*.jpg"))
    x = torch.from_numpy(np.stack([decoded(f) for f in files])).permute(0, 3, 1, 2).double()
    ref = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    got = torch.from_numpy(np.array(arrays.images)).permute(0, 3, 1, 2).double()
    diff = (got - ref.clamp(0, 255)).abs()
    assert diff.mean() < 0.5 and diff.max() <= 2.0  # rounding and PIL's fixed-point filter


def test_prepared_copy_is_built_once_and_keyed_by_size(tmp_path: Path) -> None:
    truth = write_celeba_hq(tmp_path, [0, 1, 0, 1], hw=(32, 32))
    first = CelebAHQSource(tmp_path, image_size=32).load("train")
    (folder,) = copies(tmp_path)
    assert folder.name.startswith("celeba_hq-train-32px-")
    assert json.loads((folder / "manifest.json").read_text())["n"] == 4
    stamp = (folder / "images.npy").stat().st_mtime_ns

    (tmp_path / "CelebA-HQ-img" / "3.jpg").unlink()  # a reused copy never opens the files
    again = CelebAHQSource(tmp_path, image_size=32).load("train")
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, truth["train"][1])
    assert (folder / "images.npy").stat().st_mtime_ns == stamp

    # Another size is another copy; its build finds the missing file before decoding anything.
    with pytest.raises(FileNotFoundError, match=r"CelebA-HQ-img/3\.jpg"):
        CelebAHQSource(tmp_path, image_size=16).load("train")
    assert copies(tmp_path) == [folder]


def test_an_interrupted_or_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_artbench10(tmp_path, n_per_class=1, test_per_class=0, hw=(32, 32))
    calls = {"n": 0}
    real = prepare_module.preprocess

    def interrupted(path: Path, size: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(prepare_module, "preprocess", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ArtBench10Source(tmp_path, image_size=32).load("train")
    assert copies(tmp_path) == []  # neither a partial copy nor its temporary folder

    monkeypatch.setattr(prepare_module, "preprocess", real)
    bad = tmp_path / "artbench-10-imagefolder-split" / "train" / "realism" / "artist_00005.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="artist_00005.jpg is not a readable image"):
        ArtBench10Source(tmp_path, image_size=32).load("train")
    assert copies(tmp_path) == []


def test_a_read_only_data_root_prepares_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "shared" / "celeba_hq", tmp_path / "cache"
    write_celeba_hq(data, [0, 1], hw=(32, 32))
    monkeypatch.setenv("LT_DIFFUSION_CACHE", str(cache))
    monkeypatch.setattr(prepare_module.os, "access", lambda path, mode: False)
    CelebAHQSource(data, image_size=32).load("train")
    assert not (data / ".lt_diffusion").exists()
    (built,) = (cache / "prepared").iterdir()
    assert built.name.startswith("celeba_hq-") and any(built.glob("celeba_hq-train-32px-*"))


def test_imagenet_lt_keeps_its_own_long_tail_and_evaluates_on_its_test_list(
    tmp_path: Path,
) -> None:
    counts = [2, 7, 1, 4]  # class 1 is the head: the datamodule relabels by count
    truth = write_imagenet_lt(tmp_path, counts, test_per_class=2, hw=(24, 32))
    src = ImageNetLTSource(tmp_path, image_size=24, num_classes=4)
    train = src.load("train")
    np.testing.assert_array_equal(train.labels, truth["train"][1])
    lines = (tmp_path / "ImageNet_LT_train.txt").read_text().split()
    full = decoded(tmp_path / lines[0])  # 24 x 32: the crop keeps columns 4..28
    np.testing.assert_array_equal(train.images[0], full[:, 4:28])

    dm = datamodule(src, 24, 4, profile="native", split_rule="counts")
    dm.setup()
    assert dm.class_counts == [7, 4, 2, 1]
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in (1, 3, 0, 2)]
    assert dm.class_names == wnids  # the folder names of the training list, head first
    assert dm.splits == ["few"] * 4  # the counts rule: all under 20 images
    x, y = dm.reference_set()
    assert x.shape == (8, 3, 24, 24) and torch.bincount(y).tolist() == [2, 2, 2, 2]


def test_imagenet_lt_list_errors_name_the_line(tmp_path: Path) -> None:
    write_imagenet_lt(tmp_path, [1, 1], test_per_class=1)
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a/b.JPEG 0\ntrain/a/c.JPEG\n")
    with pytest.raises(ValueError, match=r"ImageNet_LT_train.txt:2: expected '<path> <label>'"):
        ImageNetLTSource(tmp_path, image_size=16, num_classes=2).load("train")
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a/b.JPEG 5\n")
    with pytest.raises(ValueError, match="labels range over 5..5"):
        ImageNetLTSource(tmp_path, image_size=16, num_classes=2).load("train")


def test_inaturalist_classes_are_sorted_category_ids(tmp_path: Path) -> None:
    truth = write_inaturalist(tmp_path, category_ids=[7, 2, 5], train_counts=[1, 5, 3])
    src = INaturalistSource(tmp_path, image_size=24, num_classes=3)
    assert src.class_names == ["Species 2", "Species 5", "Species 7"]
    train, test = src.load("train"), src.load("test")
    np.testing.assert_array_equal(train.labels, truth["train"][1])
    np.testing.assert_array_equal(test.labels, truth["test"][1])
    assert np.bincount(train.labels).tolist() == [5, 3, 1]
    dm = datamodule(src, 24, 3, profile="native", split_rule="thirds")
    dm.setup()
    assert dm.class_counts == [5, 3, 1] and dm.class_names == src.class_names
    assert dm.splits == ["many", "medium", "few"]


def test_artbench10_is_made_long_tailed_by_the_profile(tmp_path: Path) -> None:
    write_artbench10(tmp_path, n_per_class=10, test_per_class=1, hw=(32, 32))
    src = ArtBench10Source(tmp_path, image_size=32)
    assert src.class_names == ARTBENCH_STYLES
    dm = datamodule(src, 32, 10, profile="exp", ratio=10.0, split_rule="thirds")
    dm.setup()
    assert dm.class_counts == longtail_counts("exp", 10, 10, 10.0)
    assert dm.class_names == ARTBENCH_STYLES  # already head first: the order is kept
    assert dm.splits == ["many"] * 3 + ["medium"] * 3 + ["few"] * 4
    x, y = dm.reference_set()  # balanced: the full training folder
    assert torch.bincount(y).tolist() == [10] * 10 and x.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda r: CelebAHQSource(r, 32), "CelebAMask-HQ-attribute-anno.txt"),
        (lambda r: ImageNetLTSource(r, 32, num_classes=4), "ImageNet_LT_train.txt"),
        (lambda r: INaturalistSource(r, 32, num_classes=4), "train2018.json"),
        (lambda r: ArtBench10Source(r, 32), "artbench-10-imagefolder-split"),
    ],
)
def test_an_empty_root_says_which_files_to_put_where(tmp_path: Path, make, expected) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make(tmp_path / "nothing").load("train")
    assert expected in str(err.value) and "paths.data_root" in str(err.value)


@pytest.mark.parametrize(
    "dataset,cls,size",
    [
        ("celeba_hq", CelebAHQSource, 64),
        ("imagenet_lt_32", ImageNetLTSource, 32),
        ("imagenet_lt_64", ImageNetLTSource, 64),
        ("inaturalist_32", INaturalistSource, 32),
        ("inaturalist_64", INaturalistSource, 64),
        ("artbench10", ArtBench10Source, 256),
        ("artbench10_32", ArtBench10Source, 32),
        ("artbench10_64", ArtBench10Source, 64),
    ],
)
def test_dataset_configs_build_their_sources(tmp_path: Path, dataset: str, cls, size) -> None:
    cfg = compose_config("train", [f"dataset={dataset}", f"paths.data_root={tmp_path}"])
    src = instantiate(cfg.dataset.source)
    assert isinstance(src, cls) and src.image_size == size
    assert src.num_classes == cfg.dataset.num_classes and src.root.parent == tmp_path


def _load_logged(root: Path, log: Path) -> None:
    real = prepare_module.preprocess

    def logged(path: Path, size: int) -> np.ndarray:
        with open(log, "a") as f:
            f.write(f"{path.name}\n")
        time.sleep(0.05)  # long enough for the other process to arrive mid-build
        return real(path, size)

    prepare_module.preprocess = logged
    CelebAHQSource(root, image_size=32).load("train")


def test_concurrent_loads_build_the_copy_once(tmp_path: Path) -> None:
    write_celeba_hq(tmp_path / "data", [0, 1, 0, 1, 0, 0], hw=(32, 32))
    log = tmp_path / "decoded.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_load_logged, args=(tmp_path / "data", log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 6  # each image decoded once, not once per process
    assert len(copies(tmp_path / "data")) == 1


def test_prepare_data_command_prepares_train_and_reference_splits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_imagenet_lt(tmp_path / "imagenet", [9, 3, 1], test_per_class=2, hw=(32, 32))
    overrides = [
        "dataset=imagenet_lt_32",
        "dataset.num_classes=3",
        "imbalance=native",
        f"paths.data_root={tmp_path}",
    ]
    prepare_data.main(overrides)
    out = capsys.readouterr().out
    names = [p.name.split("-")[1] for p in copies(tmp_path / "imagenet")]
    assert sorted(names) == ["test", "train"]  # ImageNet-LT evaluates against its test list
    for wnid, count in (("n01440764", 9), ("n01441764", 3), ("n01442764", 1)):
        assert any(wnid in line and f" {count} " in f" {line} " for line in out.splitlines())
