"""Data: sources in their published formats, long-tail profiles, splits, the datamodule."""

from lt_diffusion.data.datamodule import BatchStream, LongTailDataModule
from lt_diffusion.data.longtail import longtail_counts, longtail_indices, order_by_count
from lt_diffusion.data.sources import (
    CIFAR10Source,
    CIFAR100Source,
    FashionMNISTSource,
    ImageArrays,
    Source,
)
from lt_diffusion.data.splits import SPLITS, classes_in_split, split_map

__all__ = [
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
    "order_by_count",
    "split_map",
]
