"""Prepare a dataset before training and print its long-tail summary:
``python -m lt_diffusion.prepare_data dataset=imagenet_lt_64 imbalance=native``.

Takes the training command's overrides (``configs/train.yaml``) and does the data part of a run
only: reads the source, builds the one-time preprocessed copy of image-file datasets (CelebA-HQ,
ImageNet-LT, iNaturalist, ArtBench-10) for the training split and the evaluation reference,
forms the long-tailed subset and prints per-class counts and splits. Run it once on a login or
CPU node before multi-GPU or SLURM jobs, so that no GPU job spends its time decoding images.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lt_diffusion.data import LongTailDataModule
from lt_diffusion.training.builders import build_datamodule
from lt_diffusion.utils.config import compose_config


def run(overrides: Sequence[str]) -> LongTailDataModule:
    """The datamodule of the run ``overrides`` describe, set up, with its reference set."""
    cfg = compose_config("train", overrides)
    datamodule = build_datamodule(cfg, on_device=False)
    datamodule.setup("fit")
    datamodule.reference_set()  # the balanced real split (prepared too where it is another)
    return datamodule


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    run(args).print_summary()


if __name__ == "__main__":
    main()
