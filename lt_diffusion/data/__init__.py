"""Data: sources in their published formats, long-tail profiles, splits, the datamodule."""

from lt_diffusion.data.datamodule import BatchStream, LongTailDataModule, resize_uint8
from lt_diffusion.data.longtail import (
    PROFILES,
    longtail_counts,
    longtail_indices,
    native_counts,
    order_by_count,
)
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
    "BatchStream",
    "CIFAR10Source",
    "CIFAR100Source",
    "FashionMNISTSource",
    "ImageArrays",
    "LongTailDataModule",
    "Source",
    "classes_in_split",
    "longtail_counts",
    "longtail_indices",
    "native_counts",
    "order_by_count",
    "resize_uint8",
    "split_map",
]
