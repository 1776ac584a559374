"""Data: sources in their published formats, long-tail profiles, splits, the datamodule.

The public names below are imported lazily, so that ``lt_diffusion.data.splits`` (needed by
the evaluation protocol and the tables) does not pull Lightning in with the datamodule.
"""

from __future__ import annotations

from lt_diffusion.utils.lazy import lazy_exports

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
    "text_sources": ("CUB200Source", "Oxford102Source"),
    "sources": (
        "CIFAR10Source",
        "CIFAR100Source",
        "FashionMNISTSource",
        "ImageArrays",
        "Source",
        "VectorArrays",
    ),
    "splits": ("RULES", "SPLITS", "classes_in_split", "split_map"),
    "toy": ("GaussianMixtureClasses", "ToySource", "ring_mixture"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
