"""Statistics files of a dataset's real images (:mod:`lt_diffusion.evaluation.stats_file`):
the whole set, each Many / Medium / Few split and each class, in one feature space, from the
same cached features an evaluation computes (a later evaluation against the same images reuses
them, and the other way round).

Sets: ``reference`` (what evaluations compare with by default: the full, balanced training split
for a long tail made by a profile, the held-out split otherwise) or ``train`` (the long-tailed
training images the model saw).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from lt_diffusion.data.splits import SPLITS
from lt_diffusion.evaluation import extractors as X
from lt_diffusion.evaluation.evaluator import real_features, reference_split
from lt_diffusion.evaluation.metrics import SmallSampleWarning, Statistics, statistics
from lt_diffusion.evaluation.stats_file import OVERALL, write_stats

SETS = ("reference", "train")


def _images_of(datamodule: Any, which: str) -> Any:
    if which == "reference":
        return lambda c: datamodule.reference_set([c])[0]
    images, labels = datamodule.train_images.cpu(), datamodule.train_labels.cpu()
    return lambda c: images[labels == c]


def describe(datamodule: Any, which: str) -> str:
    """The images of set ``which``, in words (stored in the file)."""
    info = datamodule.info()
    if which == "reference":
        split, what = reference_split(datamodule)
        return f"{what} (split '{split}'), every image"
    return (
        f"the long-tailed training images of {info['name']} (profile {info['profile']}, "
        f"ratio {info['ratio']}, subset seed {info['subset_seed']}), every image"
    )


def dataset_statistics(
    datamodule: Any,
    out: str | Path,
    *,
    which: str = "reference",
    space: str = "inception",
    device: str | torch.device = "cpu",
    batch_size: int = 500,
    max_classes: int = 10,
    cache_dir: str | Path,
) -> tuple[Path, dict[str, Statistics]]:
    """Write the statistics of set ``which`` of ``datamodule`` (set up) in feature space
    ``space`` to ``out``: the whole set, each split, and each class with at least 2 images
    when the dataset has at most ``max_classes`` classes (a 2048-d covariance is 32 MB per
    part). Returns the path and the parts."""
    if which not in SETS:
        raise ValueError(f"set={which!r}: choose from {SETS}")
    info = datamodule.info()
    extractor, ext_info = X.load(space, device)
    images_of = _images_of(datamodule, which)
    counts = {c: len(images_of(c)) for c in range(info["num_classes"])}
    protocol = OmegaConf.create({"seed": 0, "batch_size": int(batch_size)})  # 0: as protocols
    feats = real_features(
        datamodule,
        protocol,
        extractor,
        ext_info,
        {c: n for c, n in counts.items() if n},
        Path(cache_dir),
        torch.device(device),
        images_of=images_of,
    )

    def of(classes: list[int]) -> Statistics | None:
        x = [feats[c] for c in classes if c in feats]
        if sum(len(f) for f in x) < 2:
            return None
        with warnings.catch_warnings():  # parts smaller than the dimension: the command says so
            warnings.simplefilter("ignore", SmallSampleWarning)
            return statistics(np.concatenate(x))

    parts: dict[str, Statistics | None] = {OVERALL: of(list(range(info["num_classes"])))}
    for split in SPLITS:
        parts[split] = of([c for c, s in enumerate(info["splits"]) if s == split])
    if info["num_classes"] <= max_classes:
        parts.update({f"class_{c:03d}": of([c]) for c in range(info["num_classes"])})
    kept = {k: v for k, v in parts.items() if v is not None}
    if OVERALL not in kept:
        raise ValueError(f"set {which} of {info['name']} has fewer than 2 images")
    path = write_stats(
        out,
        kept,
        extractor=ext_info["name"],
        layer=ext_info["layer"],
        weights_sha256=ext_info["weights_sha256"],
        description=describe(datamodule, which),
    )
    return path, kept
