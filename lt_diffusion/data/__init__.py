"""Data: sources in their published formats, long-tail profiles, splits, the datamodule."""

from lt_diffusion.data.datamodule import BatchStream, LongTailDataModule, resize_uint8
from lt_diffusion.data.longtail import (
    PROFILES,
    longtail_counts,
    longtail_indices,
    native_counts,
    order_by_count,
)
from lt_diffusion.data.paper_sources import (
    ArtBench10Source,
    CelebAHQSource,
    ImageNetLTSource,
    INaturalistSource,
)
from lt_diffusion.data.prepare import prepared_copy, prepared_root
from lt_diffusion.data.sources import (
    CIFAR10Source,
    CIFAR100Source,
    FashionMNISTSource,
    ImageArrays,
    Source,
)
from lt_diffusion.data.splits import RULES, SPLITS, classes_in_split, split_map

__all__ = [
    "PROFILES",
    "RULES",
    "SPLITS",
    "ArtBench10Source",
    "BatchStream",
    "CIFAR10Source",
    "CelebAHQSource",
    "CIFAR100Source",
    "FashionMNISTSource",
    "INaturalistSource",
    "ImageArrays",
    "ImageNetLTSource",
    "LongTailDataModule",
    "Source",
    "classes_in_split",
    "longtail_counts",
    "longtail_indices",
    "native_counts",
    "order_by_count",
    "prepared_copy",
    "prepared_root",
    "resize_uint8",
    "split_map",
]
