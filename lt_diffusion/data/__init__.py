"""Data: sources in their published formats, long-tail profiles, splits, the datamodule.

The public names below are imported lazily, so that ``lt_diffusion.data.splits`` (needed by
the evaluation protocol and the tables) does not pull Lightning in with the datamodule.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datamodule": ("BatchStream", "LongTailDataModule", "resize_uint8"),
    "longtail": (
        "PROFILES",
        "longtail_counts",
        "longtail_indices",
        "native_counts",
        "order_by_count",
    ),
    "paper_sources": (
        "ArtBench10Source",
        "CelebAHQSource",
        "ImageNetLTSource",
        "INaturalistSource",
    ),
    "prepare": ("prepared_copy", "prepared_root"),
    "sources": (
        "CIFAR10Source",
        "CIFAR100Source",
        "FashionMNISTSource",
        "ImageArrays",
        "Source",
    ),
    "splits": ("RULES", "SPLITS", "classes_in_split", "split_map"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
