"""The long-tailed datamodule: an imbalanced training stream and the balanced reference set.

The training set is small (tens of thousands of small images), so it is kept as one uint8
tensor, on the GPU when ``on_device``, and batches are gathered by index on that device: no
worker processes, no per-batch host transfer, no host sync.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lt_diffusion.data.longtail import (
    check_profile,
    check_ratio,
    longtail_counts,
    longtail_indices,
    order_by_count,
)
from lt_diffusion.data.sources import Source
from lt_diffusion.data.splits import RULES, SPLITS, split_map

SAMPLERS = ("uniform", "class_balanced")


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize uint8 ``(N, C, H, W)`` once (bilinear, antialiased), back to uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(1024):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


class BatchStream(IterableDataset):
    """An endless stream of ``(x in [-1, 1], y)`` batches drawn on the data's own device.

    "uniform" walks through fresh random permutations (epochs without replacement);
    "class_balanced" (RS) draws with probability proportional to ``1 / N_{y_i}``, so every
    class is equally likely.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        sampler: str = "uniform",
        hflip: bool = True,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.sampler, self.hflip, self.seed = batch_size, sampler, hflip, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.images.device
        g = torch.Generator(device=device).manual_seed(self.seed)
        n, b = len(self.labels), self.batch_size
        if self.sampler == "class_balanced":
            counts = torch.bincount(self.labels).float()
            weights = (1.0 / counts)[self.labels]
        perm, pos = torch.empty(0, dtype=torch.long, device=device), 0
        while True:
            if self.sampler == "class_balanced":
                idx = torch.multinomial(weights, b, replacement=True, generator=g)
            else:
                if pos + b > len(perm):  # start a new epoch; the tail of the last one is dropped
                    perm, pos = torch.randperm(n, generator=g, device=device), 0
                idx, pos = perm[pos : pos + b], pos + b
            x = self.images[idx].float().div_(127.5).sub_(1.0)
            if self.hflip:
                flip = torch.rand(b, generator=g, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            yield x, self.labels[idx]


class LongTailDataModule(L.LightningDataModule):
    """A dataset made long-tailed by a profile, with Many / Medium / Few splits.

    Class 0 is the most frequent class after construction (classes are relabelled by count
    when the source's order is not already so).
    """

    def __init__(
        self,
        source: Source,
        image_size: int,
        num_classes: int,
        channels: int,
        profile: str = "exp",
        ratio: float = 100.0,
        subset_seed: int = 0,
        batch_size: int = 64,
        sampler: str = "uniform",
        hflip: bool = True,
        on_device: bool = False,
        split_rule: str = "thirds",
        seed: int = 0,
        name: str = "",
    ) -> None:
        super().__init__()
        check_profile(profile)
        check_ratio(ratio)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown data sampler {sampler!r}: choose one of {SAMPLERS}")
        if split_rule not in RULES:
            raise ValueError(f"unknown split rule {split_rule!r}: choose one of {RULES}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if source.num_classes != num_classes or source.channels != channels:
            raise ValueError(
                f"dataset config says {num_classes} classes / {channels} channels but the "
                f"{source.name} source has {source.num_classes} / {source.channels}: fix "
                "dataset.num_classes / dataset.channels"
            )
        self.source, self.image_size = source, int(image_size)
        self.num_classes, self.channels = num_classes, channels
        self.profile, self.ratio, self.subset_seed = profile, float(ratio), subset_seed
        self.batch_size, self.sampler, self.hflip = batch_size, sampler, hflip
        self.on_device, self.split_rule, self.seed = on_device, split_rule, seed
        self.name = name or source.name
        self.train_images: Tensor | None = None
        self.train_labels: Tensor | None = None
        self._full: tuple[np.ndarray, np.ndarray] | None = None

    # -- construction -------------------------------------------------------------------
    def _load_full(self) -> tuple[np.ndarray, np.ndarray]:
        if self._full is None:
            arrays = self.source.load("train")
            self._full = (arrays.images, arrays.labels)
        return self._full

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is None:
            images, labels = self._load_full()
            n_max = int(np.bincount(labels, minlength=self.num_classes).max())
            counts = longtail_counts(self.profile, n_max, self.num_classes, self.ratio)
            idx = longtail_indices(labels, counts, self.subset_seed)
            # perm[new] = old: relabel so that class 0 is the most frequent.
            self.perm = order_by_count(counts)
            self.old_to_new = np.argsort(self.perm)
            self.class_counts = [int(counts[o]) for o in self.perm]
            names = self.source.class_names
            self.class_names = [str(names[o]) for o in self.perm]
            self.splits = split_map(self.class_counts, self.split_rule)
            x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous()
            self.train_images = resize_uint8(x, self.image_size)
            self.train_labels = torch.from_numpy(self.old_to_new[labels[idx]]).long()
        trainer = getattr(self, "trainer", None)
        if self.on_device and trainer is not None:
            device = trainer.strategy.root_device
            self.train_images = self.train_images.to(device)
            self.train_labels = self.train_labels.to(device)

    def train_dataloader(self) -> DataLoader:
        if self.train_images is None:
            self.setup("fit")
        rank = self.trainer.global_rank if getattr(self, "trainer", None) else 0
        stream = BatchStream(
            self.train_images,
            self.train_labels,
            self.batch_size,
            self.sampler,
            self.hflip,
            seed=self.seed * 1000 + rank,  # each DDP rank draws its own batches
        )
        return DataLoader(stream, batch_size=None, num_workers=0)

    # -- evaluation ----------------------------------------------------------------------
    def reference_set(self, classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """The balanced real set (the full, not long-tailed, training split), resized like
        training, labels in this module's class order; optionally only some classes."""
        if self.train_images is None:
            self.setup()
        images, labels = self._load_full()
        new_labels = self.old_to_new[labels]
        keep = np.ones(len(labels), bool) if classes is None else np.isin(new_labels, classes)
        x = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous()
        return resize_uint8(x, self.image_size), torch.from_numpy(new_labels[keep]).long()

    def info(self) -> dict[str, Any]:
        """A JSON-able description stored in checkpoints and records."""
        if self.train_images is None:
            self.setup()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            "splits": self.splits,
            "split_rule": self.split_rule,
            "image_size": self.image_size,
            "channels": self.channels,
            "profile": self.profile,
            "ratio": self.ratio,
            "subset_seed": self.subset_seed,
            "total": int(sum(self.class_counts)),
        }

    def summary(self) -> str:
        """Per-class counts and splits as a table (plain text)."""
        from rich.console import Console
        from rich.table import Table

        info = self.info()
        counts = info["class_counts"]
        table = Table(
            title=f"Imb. {self.name}: {info['total']} images, {self.num_classes} classes, "
            f"profile {self.profile}, IR {counts[0] / max(1, counts[-1]):g}"
        )
        for col in ("class", "name", "train images", "split"):
            table.add_column(col, justify="right" if col != "name" else "left")
        for c, (name, n, s) in enumerate(zip(info["class_names"], counts, info["splits"])):
            table.add_row(str(c), name, str(n), s)
        for s in SPLITS:
            members = [c for c in range(self.num_classes) if info["splits"][c] == s]
            total = sum(counts[c] for c in members)
            table.add_row("", f"[b]{s}[/b] ({len(members)} classes)", str(total), "")
        console = Console(width=120, record=True, force_terminal=False)
        with console.capture() as cap:
            console.print(table)
        return cap.get()

    @rank_zero_only
    def print_summary(self) -> None:
        print(self.summary(), flush=True)
