"""The long-tailed datamodule: subset, relabelling, batch stream, reference set."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lt_diffusion.data import LongTailDataModule, longtail_counts
from lt_diffusion.data.datamodule import BatchStream, resize_uint8
from lt_diffusion.data.sources import CIFAR10Source, FashionMNISTSource
from tests.fakedata import CIFAR10_NAMES, write_cifar10
from tests.test_longtail import ldam_subset

PER_CLASS = 20


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("data") / "cifar10"
    truth = write_cifar10(root, n_per_class=PER_CLASS, test_per_class=2, seed=0)
    return root, truth


def make(root: Path, **kw) -> LongTailDataModule:
    args = dict(
        source=CIFAR10Source(root, download=False),
        image_size=32,
        num_classes=10,
        channels=3,
        profile="exp",
        ratio=10,
        batch_size=16,
    )
    args.update(kw)
    dm = LongTailDataModule(**args)
    dm.setup("fit")
    return dm


def fake_trainer(device: str = "cpu", rank: int = 0, step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        global_rank=rank,
        global_step=step,
        accumulate_grad_batches=1,
    )


def take(stream, n: int) -> list:
    it = iter(stream)
    return [next(it) for _ in range(n)]


# -- construction ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7])
def test_subset_is_ldam_subset(cifar, seed: int) -> None:
    root, truth = cifar
    images, labels = truth["train"]
    dm = make(root, subset_seed=seed)
    counts = longtail_counts("exp", PER_CLASS, 10, 10)
    assert dm.class_counts == counts == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    idx = ldam_subset(labels, counts, seed)
    expected = torch.from_numpy(images[idx]).permute(0, 3, 1, 2)
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (78, 3, 32, 32)
    assert torch.equal(dm.train_images, expected)
    assert torch.equal(dm.train_labels, torch.from_numpy(labels[idx]))
    assert dm.train_labels.dtype == torch.int64
    assert dm.class_names == CIFAR10_NAMES  # exp keeps the order: class 0 is already the head
    assert dm.splits == ["many"] * 3 + ["medium"] * 3 + ["few"] * 4


def test_setup_is_idempotent(cifar) -> None:
    dm = make(cifar[0])
    first = dm.train_images
    dm.setup("fit")
    dm.setup()
    assert dm.train_images is first


def test_relabels_so_class_0_is_the_most_frequent(tmp_path: Path) -> None:
    per_class = [3, 9, 1, 5, 7, 2, 8, 4, 6, 10]
    truth = write_cifar10(tmp_path, n_per_class=per_class, test_per_class=1)
    images, labels = truth["train"]
    dm = make(tmp_path, profile="native", ratio=1)
    order = np.argsort(per_class)[::-1]  # old class of each new index (counts are distinct)
    assert dm.class_counts == sorted(per_class, reverse=True)
    assert dm.class_names == [CIFAR10_NAMES[o] for o in order]
    assert dm.splits[:3] == ["many"] * 3 and dm.splits[-4:] == ["few"] * 4
    # Every training image keeps its identity under the new label.
    for new, old in enumerate(order):
        got = dm.train_images[dm.train_labels == new]
        want = torch.from_numpy(images[labels == old]).permute(0, 3, 1, 2)
        assert torch.equal(got, want)
    ref_x, ref_y = dm.reference_set([0])
    assert torch.equal(ref_x, torch.from_numpy(images[labels == order[0]]).permute(0, 3, 1, 2))
    assert (ref_y == 0).all()


def test_resize_matches_pil_bilinear(cifar) -> None:
    root, truth = cifar
    dm = make(root, image_size=16)
    assert dm.train_images.shape[1:] == (3, 16, 16) and dm.train_images.dtype == torch.uint8
    images, labels = truth["train"]
    idx = ldam_subset(labels, dm.class_counts, 0)
    # PIL's antialiased bilinear (fixed point) agrees with torch's to one grey level.
    pil = np.stack([np.asarray(Image.fromarray(images[i]).resize((16, 16), 2)) for i in idx])
    ours = dm.train_images.permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(ours - pil).max() <= 1
    assert torch.equal(resize_uint8(dm.train_images, 16), dm.train_images)  # same size: as is


# -- the batch stream ------------------------------------------------------------------------
def test_batches_are_the_images_in_minus_one_one(cifar) -> None:
    dm = make(cifar[0], hflip=False)
    stream = dm.train_dataloader()
    indices = BatchStream(dm.train_images, dm.train_labels, 16, hflip=False).indices()
    for x, y in take(stream, 3):
        idx = next(indices)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (16, 3, 32, 32)
        assert torch.equal(y, dm.train_labels[idx])
        expected = dm.train_images[idx].double() / 127.5 - 1
        assert torch.allclose(x.double(), expected, atol=1e-6)
        assert x.min() >= -1 and x.max() <= 1


def test_uniform_covers_every_index_once_per_epoch() -> None:
    n, b, epochs = 37, 8, 4  # batches run across epoch ends
    labels = torch.arange(n) % 3
    stream = BatchStream(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), labels, b, seed=5)
    it = stream.indices()
    seen = torch.cat([next(it) for _ in range(-(-n * epochs // b))])[: n * epochs]
    perms = seen.view(epochs, n)
    for p in perms:
        assert torch.equal(p.sort().values, torch.arange(n))
    assert not torch.equal(perms[0], perms[1])  # a fresh order each epoch
    # A batch larger than the whole set still walks whole epochs.
    big = BatchStream(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), labels, 3 * n + 5, seed=1)
    first = next(big.indices())
    assert torch.equal(first[: 3 * n].view(3, n).sort(dim=1).values, torch.arange(n).repeat(3, 1))


def test_class_balanced_draws_every_class_equally(cifar) -> None:
    dm = make(cifar[0], sampler="class_balanced", batch_size=100, hflip=False, seed=2)
    stream = BatchStream(dm.train_images, dm.train_labels, 100, "class_balanced", seed=2)
    it = stream.indices()
    idx = torch.cat([next(it) for _ in range(200)])
    # The datamodule's batches are these draws.
    for k, (_, y) in enumerate(take(dm.train_dataloader(), 3)):
        assert torch.equal(y, dm.train_labels[idx[100 * k : 100 * (k + 1)]])
    freq = torch.bincount(dm.train_labels[idx], minlength=10).double()
    expected = len(idx) / 10
    chi2 = ((freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 33.7, freq  # chi-square, 9 degrees of freedom, p = 1e-4
    # The uniform sampler, by contrast, follows the long tail (20 vs 2 images).
    it = BatchStream(dm.train_images, dm.train_labels, 100, "uniform").indices()
    uni = dm.train_labels[torch.cat([next(it) for _ in range(78)])]  # 100 epochs
    assert torch.bincount(uni, minlength=10).tolist() == [100 * k for k in dm.class_counts]
    # Inside a class, every image is equally likely: both images of the tail class.
    tail = idx[dm.train_labels[idx] == 9]
    _, per_image = tail.unique(return_counts=True)
    assert len(per_image) == 2 and abs(per_image[0] / len(tail) - 0.5) < 0.05


def test_hflip_flips_about_half(cifar) -> None:
    dm = make(cifar[0], hflip=True, batch_size=32)
    indices = BatchStream(dm.train_images, dm.train_labels, 32).indices()
    flipped = total = 0
    for x, _ in take(dm.train_dataloader(), 10):
        base = dm.train_images[next(indices)].float() / 127.5 - 1
        same = (x - base).abs().flatten(1).amax(1) < 1e-6
        mirrored = (x - base.flip(3)).abs().flatten(1).amax(1) < 1e-6
        assert (same ^ mirrored).all()  # each image is itself or its mirror image
        flipped += int(mirrored.sum())
        total += len(x)
    assert 0.35 < flipped / total < 0.65


@pytest.mark.parametrize("sampler", ["uniform", "class_balanced"])
def test_stream_is_a_function_of_seed_rank_and_step(cifar, sampler: str) -> None:
    dm = make(cifar[0], sampler=sampler, batch_size=16, seed=3)
    fresh = take(dm.train_dataloader(), 8)
    # A resumed run (trainer at step 5) continues with batch 5 exactly.
    dm.trainer = fake_trainer(step=5)
    resumed = take(dm.train_dataloader(), 3)
    for (x, y), (xr, yr) in zip(fresh[5:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    # Another rank draws other batches; the same rank and seed the same ones.
    dm.trainer = fake_trainer(rank=1)
    other = take(dm.train_dataloader(), 2)
    assert not torch.equal(other[0][1], fresh[0][1])
    dm.trainer = None
    assert all(torch.equal(a[0], b[0]) for a, b in zip(take(dm.train_dataloader(), 2), fresh))


def test_on_device_moves_the_set_once(cifar) -> None:
    dm = LongTailDataModule(CIFAR10Source(cifar[0], download=False), 32, 10, 3, ratio=10)
    dm.trainer = fake_trainer("meta")
    dm.setup("fit")
    assert dm.train_images.device.type == "cpu"  # on_device=False: stays on the host
    for flag, expected in [(True, "meta"), ("auto", "cpu")]:  # auto: only onto a GPU
        dm = LongTailDataModule(
            CIFAR10Source(cifar[0], download=False), 32, 10, 3, ratio=10, on_device=flag
        )
        dm.setup()
        dm.trainer = fake_trainer("meta")
        dm.setup("fit")
        assert dm.train_images.device.type == expected
        assert dm.train_labels.device.type == expected


def test_lightning_trainer_consumes_the_stream(cifar, tmp_path: Path) -> None:
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.append((x.shape, y.dtype))
            return (self.w - x.mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = LongTailDataModule(CIFAR10Source(cifar[0], download=False), 32, 10, 3, ratio=10)
    dm.batch_size = 4
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Probe(), datamodule=dm)
    assert seen == [(torch.Size([4, 3, 32, 32]), torch.int64)] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["uniform", "class_balanced"])
def test_gpu_stream_without_host_sync(cifar, sampler: str) -> None:
    dm = LongTailDataModule(
        CIFAR10Source(cifar[0], download=False), 32, 10, 3, ratio=10, on_device=True,
        sampler=sampler, batch_size=64,
    )  # fmt: skip
    dm.trainer = fake_trainer("cuda")
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # the class-balanced stream syncs once, before its first batch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            x, y = next(it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32


# -- evaluation side -------------------------------------------------------------------------
def test_reference_set_is_balanced_and_consistent(cifar) -> None:
    root, truth = cifar
    dm = make(root)
    x, y = dm.reference_set()
    assert x.dtype == torch.uint8 and x.device.type == "cpu" and x.shape == (200, 3, 32, 32)
    assert torch.bincount(y, minlength=10).tolist() == [PER_CLASS] * 10
    # Every training image is in the reference set, under the same label.
    label_of = {bytes(img.numpy().tobytes()): int(lbl) for img, lbl in zip(x, y)}
    for img, lbl in zip(dm.train_images, dm.train_labels):
        assert label_of[img.numpy().tobytes()] == int(lbl)
    x2, y2 = dm.reference_set([9, 2])
    assert sorted(y2.unique().tolist()) == [2, 9] and len(y2) == 2 * PER_CLASS
    assert torch.equal(x2, x[(y == 2) | (y == 9)])
    with pytest.raises(ValueError, match=r"classes \[10\] are outside 0..9"):
        dm.reference_set([10])
    small = make(root, image_size=16).reference_set([0])[0]
    assert small.shape == (PER_CLASS, 3, 16, 16)


def test_info_and_summary(cifar) -> None:
    dm = make(cifar[0], name="cifar10_lt")
    info = json.loads(json.dumps(dm.info()))
    assert info["name"] == "cifar10_lt" and info["total"] == 78 == sum(info["class_counts"])
    assert info["class_counts"] == dm.class_counts and info["splits"] == dm.splits
    assert info["ratio"] == 10.0 and info["profile"] == "exp" and info["subset_seed"] == 0
    assert info["num_classes"] == 10 and info["channels"] == 3 and info["image_size"] == 32
    text = dm.summary()
    for name in CIFAR10_NAMES:
        assert name in text
    assert "many (3 classes)" in text and "few (4 classes)" in text
    assert "46" in text and "21" in text and "11" in text  # per-split totals 20+15+11, ...
    assert "actual max/min 10" in text and "78" in text


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,error,pattern",
    [
        ({"ratio": 0.5}, ValueError, "imbalance ratio must be >= 1.*ir1"),
        ({"profile": "zipf"}, ValueError, "unknown long-tail profile 'zipf'.*exp, step"),
        ({"sampler": "balanced"}, ValueError, "unknown data sampler.*uniform, class_balanced"),
        ({"num_classes": 100}, ValueError, "100 classes.*10 classes.*dataset.num_classes"),
        ({"channels": 1}, ValueError, "1 channels.*3 channels.*dataset.channels"),
        ({"split_rule": "half"}, ValueError, "unknown split rule"),
        ({"on_device": "gpu"}, ValueError, "on_device must be true, false or auto"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"source": {"root": "x"}}, TypeError, "dataset.source._target_"),
    ],
)
def test_bad_config_fails_in_init(tmp_path: Path, kw: dict, error: type, pattern: str) -> None:
    args = dict(
        source=CIFAR10Source(tmp_path / "missing", download=False),
        image_size=32,
        num_classes=10,
        channels=3,
    )
    args.update(kw)
    with pytest.raises(error, match=pattern):
        LongTailDataModule(**args)


def test_missing_data_fails_in_setup_naming_the_folder(tmp_path: Path) -> None:
    dm = LongTailDataModule(CIFAR10Source(tmp_path / "nope", download=False), 32, 10, 3)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "cifar-10-batches-py")):
        dm.setup()


def test_ratio_too_large_for_the_data(cifar) -> None:
    with pytest.raises(ValueError, match="leaves the last class with 0 of 20 images"):
        make(cifar[0], ratio=100)


def test_fashion_mnist_config_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lt_diffusion.data import sources
    from tests.fakedata import write_fashion_mnist

    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    write_fashion_mnist(tmp_path, 10, 1)
    dm = LongTailDataModule(
        FashionMNISTSource(tmp_path, download=False), 28, 10, 1, ratio=10, hflip=False
    )
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and dm.class_counts[-1] == 1
    assert dm.class_names[0] == "T-shirt/top"
