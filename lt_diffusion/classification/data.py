"""The classifier's data: the long-tailed training set of a :class:`LongTailDataModule` (the
same subset, class order and Many / Medium / Few map as the diffusion runs), optionally
extended by generated images, served as a stream of randomly cropped and flipped batches; and
the dataset's test split in the same class order.

Augmentation of each batch (Cao et al. 2019, their CIFAR code): a random crop of the image
size from the image padded by ``crop_padding`` (4) pixels of black (-1 in the [-1, 1] range
the images are served in), then the datamodule's horizontal flip (``dataset.hflip``). As the
diffusion runs' stream, batch ``k`` is a pure function of ``(seed, rank, k)``, so a resumed run
sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lt_diffusion.data.datamodule import BatchStream, LongTailDataModule, resize_uint8

_CROP = 3  # the crop's random stream (the datamodule uses 0-2: permutation, draws, flips)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Each image of ``x`` (B, C, H, W, in [-1, 1]) padded by ``padding`` pixels of -1 and cut
    back to H x W at a uniformly drawn offset (torchvision's ``RandomCrop(padding=p)`` per
    image, batched)."""
    if padding == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indexing puts the indexed dims first: (B, H, W, C) -> (B, C, H, W)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class CroppedStream(BatchStream):
    """:class:`BatchStream` (permutation or class-balanced draws, flips) plus a random crop."""

    def __init__(self, *args: Any, crop_padding: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crop_padding = int(crop_padding)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for k, (x, y) in enumerate(super().__iter__(), start=self.start_batch):
            yield random_crop(x, self.crop_padding, self._generator(_CROP, k)), y


class ClassificationData(L.LightningDataModule):
    """Training stream and test split of a classification run.

    Args:
        base: the long-tailed datamodule (``cfg.data``); its subset, class order and splits.
        crop_padding: random-crop padding in pixels (0: no crop).
    """

    def __init__(self, base: LongTailDataModule, crop_padding: int = 4) -> None:
        super().__init__()
        if crop_padding < 0:
            raise ValueError(f"train.crop_padding must be >= 0, got {crop_padding}")
        self.base = base
        self.crop_padding = int(crop_padding)
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.n_generated = 0

    def prepare(self) -> None:
        """Read the long-tailed training set (once); ``base`` then has the real images' class
        counts, class names and splits."""
        if self.images is None:
            self.base.setup()
            self.images, self.labels = self.base.train_images, self.base.train_labels

    @property
    def class_counts(self) -> list[int]:
        """Training images per class, generated ones included (what the losses take)."""
        self.prepare()
        return self.labels.bincount(minlength=self.base.num_classes).tolist()

    def add_generated(self, images: Tensor, labels: Tensor) -> None:
        """Extend the training set by uint8 ``images`` (N, C, H, W) of ``labels``."""
        self.prepare()
        if images.dtype != torch.uint8 or images.shape[1:] != self.images.shape[1:]:
            raise ValueError(
                f"generated images are {images.dtype} {tuple(images.shape[1:])}, the training "
                f"images uint8 {tuple(self.images.shape[1:])}: generate with a run of this "
                "dataset at its image size and channels"
            )
        self.images = torch.cat([self.images, images.to(self.images.device)])
        self.labels = torch.cat([self.labels, labels.to(self.labels.device)])
        self.n_generated += len(labels)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        trainer = self.trainer
        on_device = self.base.on_device
        if trainer is not None and on_device is not False:
            device = trainer.strategy.root_device
            if on_device is True or device.type == "cuda":
                self.images, self.labels = self.images.to(device), self.labels.to(device)

    def train_dataloader(self) -> DataLoader:
        self.prepare()
        rank, start = 0, 0
        if self.trainer is not None:
            rank, start = int(self.trainer.global_rank), int(self.trainer.global_step)
        stream = CroppedStream(
            self.images,
            self.labels,
            self.base.batch_size,
            self.base.sampler,
            self.base.hflip,
            seed=self.base.seed,
            rank=rank,
            start_batch=start,
            crop_padding=self.crop_padding,
        )
        return DataLoader(stream, batch_size=None, num_workers=0)

    def test_set(self) -> tuple[Tensor, Tensor]:
        """The source's test split: uint8 ``(N, C, H, W)`` at the training size and labels in
        this run's class order (class 0 the most frequent training class)."""
        self.prepare()
        arrays = self.base.source.load("test")
        labels = np.asarray(arrays.labels, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(arrays.images)).permute(0, 3, 1, 2)
        y = torch.from_numpy(self.base.old_to_new[labels]).long()
        return resize_uint8(x, self.base.image_size), y
