"""The long-tailed datamodule: an imbalanced training stream and the balanced reference set.

The training sets here are small (tens of thousands of small images), so the subset is kept
as one uint8 tensor, on the GPU when ``on_device``, and batches are gathered by index on that
device: no worker processes, no per-batch host transfer, no host-device sync.

The stream is a pure function of ``(seed, rank, batch index)``: batch ``k`` is the same
whether the run started at step 0 or resumed at step ``k``, so a resumed run sees exactly the
batches an uninterrupted one would have seen.

A source with captions (``source.captions(split)``, :mod:`lt_diffusion.data.text_sources`)
gives each training image its text descriptions; the stream then also serves, per sample, the
row of one of its image's captions in :attr:`LongTailDataModule.train_captions` flattened
(drawn uniformly among them, from the same seeded streams).

A source of vector data (``data_kind = "vector"``, e.g. the synthetic benchmark of
:mod:`lt_diffusion.data.toy`) gives float points ``(N, D)``: they are served as they are, with
no uint8 scaling, resizing or flipping (``dataset.image_size`` must be null and
``dataset.hflip`` false).
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
    native_counts,
    order_by_count,
)
from lt_diffusion.data.sources import Source
from lt_diffusion.data.splits import SPLITS, check_rule, split_map

SAMPLERS = ("uniform", "class_balanced")
ON_DEVICE = (True, False, "auto")
# Independent random streams derived from one seed (see stream_seed).
_PERMUTATION, _DRAW, _FLIP, _CAPTION = 0, 1, 2, 3


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize uint8 ``(N, C, H, W)`` to ``size`` x ``size`` (bilinear, antialiased), as uint8."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    out = []
    for chunk in images.split(1024):  # bounds the float32 copy's memory
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out).contiguous()


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for ``torch.Generator`` derived from integers (seed, rank, stream, k).

    NumPy's SeedSequence hashes the parts, so nearby tuples give unrelated streams (a plain
    ``seed * 1000 + rank`` would make seed 1 / rank 0 equal seed 0 / rank 1000).
    """
    entropy = [int(p) & (2**64 - 1) for p in parts]  # SeedSequence takes non-negative ints
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) >> 1


class BatchStream(IterableDataset):
    """An endless stream of ``(x in [-1, 1], y)`` batches drawn on the data's own device.

    "uniform" walks through fresh random permutations of the whole set, one per epoch, batches
    running on across epoch ends (every image once per epoch); "class_balanced" (RS, Mahajan
    et al. 2018) draws with replacement with probability proportional to ``1 / N_{y_i}``:
    a class uniformly among those present, then an image uniformly inside it. ``start_batch``
    skips the first batches without computing them (resume).

    ``images`` may also be float features encoded once from the images (a latent backbone's
    autoencoder posterior): they are served as they are, and ``mirrored`` (the features of the
    flipped images) replaces the pixel flip.

    ``caption_counts`` (captions per image, a text-to-image dataset) makes the stream yield
    ``(x, y, rows)``: ``rows[i]`` is one caption of image ``idx[i]``, drawn uniformly, as a row
    of the flattened caption table (image 0's captions first, then image 1's ...).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        sampler: str = "uniform",
        hflip: bool = True,
        seed: int = 0,
        rank: int = 0,
        start_batch: int = 0,
        mirrored: Tensor | None = None,
        caption_counts: Tensor | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown data sampler {sampler!r}: choose one of {SAMPLERS}")
        if len(labels) == 0 or len(images) != len(labels):
            raise ValueError(
                f"BatchStream needs as many images as labels, at least one: got "
                f"{len(images)} and {len(labels)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mirrored is not None and mirrored.shape != images.shape:
            raise ValueError(
                f"mirrored features {tuple(mirrored.shape)} must match {tuple(images.shape)}"
            )
        if caption_counts is not None and (
            caption_counts.shape != labels.shape or bool((caption_counts < 1).any())
        ):
            raise ValueError(
                f"caption_counts must give every one of the {len(labels)} images >= 1 caption, "
                f"got shape {tuple(caption_counts.shape)}"
            )
        self.images, self.labels, self.mirrored = images, labels, mirrored
        self.caption_counts = caption_counts
        if caption_counts is not None:
            self.caption_offsets = torch.cumsum(caption_counts, 0) - caption_counts
        self.batch_size, self.sampler, self.hflip = int(batch_size), sampler, bool(hflip)
        self.seed, self.rank, self.start_batch = int(seed), int(rank), int(start_batch)

    def _generator(self, stream: int, k: int) -> torch.Generator:
        device = self.images.device
        return torch.Generator(device=device).manual_seed(
            stream_seed(self.seed, self.rank, stream, k)
        )

    def _uniform_indices(self) -> Iterator[Tensor]:
        n, b, device = len(self.labels), self.batch_size, self.labels.device
        current, perm = -1, torch.empty(0, dtype=torch.long, device=device)
        k = self.start_batch
        while True:
            pieces, pos, end = [], k * b, (k + 1) * b
            while pos < end:  # a batch may run across one or more epoch ends
                epoch, offset = divmod(pos, n)
                if epoch != current:  # positions only grow: the last epoch's order is done
                    g = self._generator(_PERMUTATION, epoch)
                    current, perm = epoch, torch.randperm(n, generator=g, device=device)
                take = min(end - pos, n - offset)
                pieces.append(perm[offset : offset + take])
                pos += take
            yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            k += 1

    def _balanced_indices(self) -> Iterator[Tensor]:
        b, labels = self.batch_size, self.labels
        counts = torch.bincount(labels)
        present = torch.nonzero(counts).flatten()  # one sync, before the first batch only
        order = torch.argsort(labels, stable=True)  # images grouped by class
        offsets = torch.cumsum(counts, 0) - counts
        k = self.start_batch
        while True:
            g = self._generator(_DRAW, k)
            cls = present[torch.randint(len(present), (b,), generator=g, device=labels.device)]
            size = counts[cls]
            u = torch.rand(b, generator=g, device=labels.device, dtype=torch.float64)
            within = torch.minimum((u * size).long(), size - 1)  # guard against u * size == size
            yield order[offsets[cls] + within]
            k += 1

    def indices(self) -> Iterator[Tensor]:
        """The stream of batch indices into ``images`` (from ``start_batch`` on)."""
        return self._uniform_indices() if self.sampler == "uniform" else self._balanced_indices()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.batch_size
        for k, idx in enumerate(self.indices(), start=self.start_batch):
            x = self.images[idx]
            if not x.is_floating_point():  # uint8 pixels; encoded features are served as is
                x = x.float().div_(127.5).sub_(1.0)
            if self.hflip:
                flip = torch.rand(b, generator=self._generator(_FLIP, k), device=x.device) < 0.5
                flipped = x.flip(3) if self.mirrored is None else self.mirrored[idx]
                x = torch.where(flip[:, None, None, None], flipped, x)
            if self.caption_counts is None:
                yield x, self.labels[idx]
                continue
            u = torch.rand(b, generator=self._generator(_CAPTION, k), device=x.device)
            n = self.caption_counts[idx]
            yield (
                x,
                self.labels[idx],
                self.caption_offsets[idx] + torch.minimum((u * n).long(), n - 1),
            )


class LongTailDataModule(L.LightningDataModule):
    """A dataset made long-tailed by a profile, with Many / Medium / Few splits.

    Class 0 is the most frequent class after construction (classes are relabelled by count
    when the source's order is not already so; the exp and step profiles keep the order).
    ``on_device``: True holds the training set on the trainer's device, "auto" only when that
    device is a GPU.
    """

    def __init__(
        self,
        source: Source,
        image_size: int | None,
        num_classes: int,
        channels: int,
        profile: str = "exp",
        ratio: float = 100.0,
        subset_seed: int = 0,
        batch_size: int = 64,
        sampler: str = "uniform",
        hflip: bool = True,
        on_device: bool | str = False,
        split_rule: str = "thirds",
        seed: int = 0,
        name: str = "",
    ) -> None:
        super().__init__()
        # Cheap checks only: a bad config stops here, before any file is read.
        for attr in ("load", "num_classes", "channels", "name"):
            if not hasattr(source, attr):
                raise TypeError(
                    f"data.source must be a dataset source (lt_diffusion.data.sources), got "
                    f"{type(source).__name__} without {attr!r}: check dataset.source._target_"
                )
        check_profile(profile)
        ratio = check_ratio(ratio)
        check_rule(split_rule)
        if sampler not in SAMPLERS:
            raise ValueError(
                f"unknown data sampler {sampler!r}: choose one of {', '.join(SAMPLERS)} "
                "(data.sampler)"
            )
        if on_device not in ON_DEVICE or not isinstance(on_device, bool | str):
            raise ValueError(f"data.on_device must be true, false or auto, got {on_device!r}")
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.vector = getattr(source, "data_kind", "image") == "vector"
        if self.vector:
            # Points are served as they are: image options would silently mean nothing.
            if image_size is not None or hflip:
                raise ValueError(
                    f"the {source.name} source gives vectors, not images: set "
                    "dataset.image_size=null and dataset.hflip=false (got "
                    f"image_size={image_size}, hflip={hflip})"
                )
        elif image_size is None or int(image_size) < 1:
            raise ValueError(f"dataset.image_size must be >= 1, got {image_size}")
        if source.num_classes != num_classes or source.channels != channels:
            raise ValueError(
                f"the dataset config says {num_classes} classes and {channels} channels but "
                f"the {source.name} source has {source.num_classes} classes and "
                f"{source.channels} channels: fix dataset.num_classes / dataset.channels, or "
                "dataset.source"
            )
        self.source = source
        self.image_size = None if self.vector else int(image_size)
        self.num_classes, self.channels = num_classes, channels
        self.profile, self.ratio, self.subset_seed = profile, ratio, int(subset_seed)
        self.batch_size, self.sampler, self.hflip = int(batch_size), sampler, bool(hflip)
        self.on_device, self.split_rule, self.seed = on_device, split_rule, int(seed)
        self.name = name or source.name
        self.train_images: Tensor | None = None
        self.train_labels: Tensor | None = None
        self.class_counts: list[int] = []
        self.class_names: list[str] = []
        self.splits: list[str] = []
        self._full: tuple[np.ndarray, np.ndarray] | None = None
        self._reference: tuple[Tensor, Tensor] | None = None
        self._encoded: tuple[Tensor, Tensor | None] | None = None
        # Captions of every training image, in train_images order (text-to-image sources).
        self.train_captions: list[tuple[str, ...]] | None = None

    # -- construction -------------------------------------------------------------------
    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The source's ``split`` as (images or points, int64 labels), checked."""
        arrays = self.source.load(split)
        data = arrays.points if self.vector else arrays.images
        labels = np.asarray(arrays.labels, dtype=np.int64)
        if self.vector:
            ok = data.dtype == np.float32 and data.ndim == 2 and data.shape[1] == self.channels
            want = f"float32 (N, {self.channels})"
        else:
            ok = data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == self.channels
            want = f"uint8 (N, H, W, {self.channels})"
        if not ok or labels.shape != (len(data),):
            raise ValueError(
                f"the {self.source.name} source's {split} split gave data {data.dtype} "
                f"{data.shape} and labels {labels.shape}; expected {want} and (N,): the source "
                "is broken"
            )
        return data, labels

    def _as_tensor(self, data: np.ndarray) -> Tensor:
        """Images as uint8 ``(N, C, H, W)`` at ``image_size``; points as they are."""
        if self.vector:
            return torch.from_numpy(np.array(data, dtype=np.float32))
        # A prepared copy is a read-only memory map: hold a private writable copy.
        x = torch.from_numpy(np.require(data, requirements="W")).permute(0, 3, 1, 2)
        return resize_uint8(x, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        """Build the long-tailed subset once; move it to the trainer's device when asked."""
        if self.train_images is None:
            self._build()
        trainer = self.trainer
        if trainer is not None and self.on_device is not False:
            device = trainer.strategy.root_device
            if self.on_device is True or device.type == "cuda":
                self.train_images = self.train_images.to(device)
                self.train_labels = self.train_labels.to(device)

    def _build(self) -> None:
        images, labels = self._load("train")
        if self.profile == "native":
            counts = native_counts(labels, self.num_classes)
            idx = np.arange(len(labels))
        else:
            n_max = int(np.bincount(labels, minlength=self.num_classes).max())
            counts = longtail_counts(self.profile, n_max, self.num_classes, self.ratio)
            idx = longtail_indices(labels, counts, self.subset_seed)
        # A source with hidden structure (the synthetic benchmark's transfer variant) checks
        # that the long-tailed draw misses exactly what it says, before any training.
        check = getattr(self.source, "check_training_set", None)
        if check is not None:
            check(images[idx], labels[idx])
        names = list(self.source.class_names)
        if len(names) != self.num_classes:
            raise ValueError(
                f"the {self.source.name} source names {len(names)} classes, expected "
                f"{self.num_classes}: the source is broken"
            )
        # perm[new] = old; old_to_new[old] = new: class 0 becomes the most frequent.
        self.perm = order_by_count(counts)
        self.old_to_new = np.argsort(self.perm)
        self.class_counts = [int(counts[o]) for o in self.perm]
        self.class_names = [str(names[o]) for o in self.perm]
        self.splits = split_map(self.class_counts, self.split_rule)
        self.train_images = self._as_tensor(np.ascontiguousarray(images[idx]))
        self.train_labels = torch.from_numpy(self.old_to_new[labels[idx]]).long()
        self._full = (images, labels)
        if hasattr(self.source, "captions"):
            every = self.source.captions("train")
            if len(every) != len(labels):
                raise ValueError(
                    f"the {self.source.name} source gave {len(every)} caption lists for "
                    f"{len(labels)} training images: the source is broken"
                )
            self.train_captions = [tuple(every[i]) for i in idx]

    def caption_table(self) -> tuple[list[str], Tensor]:
        """The training captions flattened in ``train_images`` order (the rows the stream
        serves) and the class of each, int64. Only for a source with captions."""
        self._ensure_setup()
        if self.train_captions is None:
            raise ValueError(
                f"the {self.source.name} source has no captions: a text-conditioned backbone "
                "needs a text-to-image dataset (dataset=cub200 or oxford102)"
            )
        classes = self.train_labels.cpu().repeat_interleave(self._caption_counts())
        return [text for group in self.train_captions for text in group], classes

    def _caption_counts(self) -> Tensor:
        """Captions per training image, int64, in ``train_images`` order."""
        assert self.train_captions is not None
        return torch.tensor([len(c) for c in self.train_captions])

    def _ensure_setup(self) -> None:
        if self.train_images is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        """An endless stream of ``(x, y)`` batches (see :class:`BatchStream`)."""
        self._ensure_setup()
        trainer = self.trainer
        rank, start = 0, 0
        if trainer is not None:
            rank = int(trainer.global_rank)
            # Resume where the checkpoint left off: batches consumed so far.
            start = int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1))
        images, mirrored = self._encoded or (self.train_images, None)
        stream = BatchStream(
            images,
            self.train_labels,
            self.batch_size,
            self.sampler,
            self.hflip,
            seed=self.seed,
            rank=rank,  # each DDP rank draws its own batches
            start_batch=start,
            mirrored=mirrored,
            caption_counts=None
            if self.train_captions is None
            else self._caption_counts().to(images.device),
        )
        return DataLoader(stream, batch_size=None, num_workers=0)

    def use_encoded(self, features: Tensor, mirrored: Tensor | None = None) -> None:
        """Serve ``features`` (one row per training image, in ``train_images`` order, e.g. a
        latent backbone's autoencoder posterior) instead of the pixels; ``mirrored`` holds the
        features of the flipped images, used when ``hflip`` is on. Kept on the device of the
        training images."""
        self._ensure_setup()
        if len(features) != len(self.train_images) or not features.is_floating_point():
            raise ValueError(
                f"use_encoded needs float features for the {len(self.train_images)} training "
                f"images, got {features.dtype} {tuple(features.shape)}"
            )
        if self.hflip and mirrored is None:
            raise ValueError(
                "hflip is on: pass the features of the mirrored images too (flipping encoded "
                "features is not flipping the images)"
            )
        device = self.train_images.device
        self._encoded = (
            features.to(device),
            mirrored.to(device) if mirrored is not None else None,
        )

    # -- evaluation ----------------------------------------------------------------------
    def reference_set(self, classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """The balanced real images for evaluation: uint8 ``(N, C, H, W)`` (float ``(N, D)``
        points for a vector source) and int64 labels on the CPU, in this module's class order,
        optionally only some classes.

        For a profile-made long tail this is the full (not long-tailed) training split,
        resized like training. Computed once and cached: do not modify it in place.
        """
        self._ensure_setup()
        if self._reference is None:
            split = getattr(self.source, "reference_split", "train")
            if split == "train" and self._full is not None:
                images, labels = self._full
            else:
                images, labels = self._load(split)
            x = self._as_tensor(images)
            self._reference = (x, torch.from_numpy(self.old_to_new[labels]).long())
            self._full = None  # the resized copy replaces it
        x, y = self._reference
        if classes is None:
            return x, y
        wanted = [int(c) for c in classes]
        bad = [c for c in wanted if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(
                f"reference_set: classes {bad} are outside 0..{self.num_classes - 1} "
                f"({self.name} has {self.num_classes} classes)"
            )
        keep = torch.isin(y, torch.tensor(wanted, dtype=torch.long))
        return x[keep], y[keep]

    def info(self) -> dict[str, Any]:
        """A JSON-able description stored in checkpoints and records."""
        self._ensure_setup()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_counts": list(self.class_counts),
            "splits": list(self.splits),
            "split_rule": self.split_rule,
            "image_size": self.image_size,  # None: vector data
            "channels": self.channels,  # vector data: coordinates per point
            "profile": self.profile,
            "ratio": self.ratio,
            "subset_seed": self.subset_seed,
            "total": int(sum(self.class_counts)),
        }

    def summary(self) -> str:
        """Every class (index, name, training images, split), per-split totals, the total
        and the actual imbalance ratio, as a plain-text table."""
        from rich.console import Console
        from rich.table import Table

        info = self.info()
        counts, splits = info["class_counts"], info["splits"]
        nonzero = [k for k in counts if k > 0]
        actual = max(counts) / min(nonzero) if nonzero else float("nan")
        noun = "points" if self.vector else "images"
        table = Table(
            title=f"{self.name}: {info['total']} training {noun}, {self.num_classes} classes",
            caption=(
                f"profile native: the data's own long tail, max/min {actual:.4g}"
                if self.profile == "native"
                else f"profile {self.profile}, IR {self.ratio:g} (actual max/min {actual:.4g})"
            ),
        )
        for col in ("class", "name", f"train {noun}", "split"):
            table.add_column(col, justify="left" if col == "name" else "right")
        for c, (name, n, s) in enumerate(zip(info["class_names"], counts, splits)):
            table.add_row(str(c), name, str(n), s)
        table.add_section()
        for s in SPLITS:
            members = [c for c in range(self.num_classes) if splits[c] == s]
            span = f"{members[0]}-{members[-1]}" if members else "-"
            total = sum(counts[c] for c in members)
            table.add_row(span, f"{s} ({len(members)} classes)", str(total), s)
        table.add_row("", "total", str(info["total"]), "")
        console = Console(width=120, force_terminal=False, color_system=None)
        with console.capture() as cap:
            console.print(table)
        return cap.get()

    @rank_zero_only
    def print_summary(self) -> None:
        """Print :meth:`summary` (global rank 0 only)."""
        print(self.summary(), flush=True)
