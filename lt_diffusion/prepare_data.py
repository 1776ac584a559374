"""Prepare a dataset before training and print its long-tail summary:
``python -m lt_diffusion.prepare_data dataset=imagenet_lt_64 imbalance=native``.

Takes the training command's overrides (``configs/train.yaml``) and does the data part of a run
only: reads the source, builds the one-time preprocessed copy of image-file datasets (CelebA-HQ,
ImageNet-LT, iNaturalist, ArtBench-10) for the training split and the evaluation reference,
forms the long-tailed subset and prints per-class counts and splits. Run it once on a login or
CPU node before multi-GPU or SLURM jobs, so that no GPU job spends its time decoding images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lt_diffusion.utils.command import config_groups, overrides_command
from lt_diffusion.utils.config import compose_config

if TYPE_CHECKING:
    from lt_diffusion.data import LongTailDataModule

# The groups that decide what is prepared (any other training key is accepted too).
_GROUPS = ("dataset", "imbalance", "paths")


def run(overrides: Sequence[str]) -> LongTailDataModule:
    """The datamodule of the run ``overrides`` describe, set up, with its reference set."""
    # Imported here: Lightning takes seconds to import, which --help should not wait for.
    from lt_diffusion.runs.build import build_datamodule

    cfg = compose_config("train", overrides)
    datamodule = build_datamodule(cfg, on_device=False)
    datamodule.setup("fit")
    datamodule.reference_set()  # the balanced real split (prepared too where it is another)
    return datamodule


def help_text() -> str:
    """``--help``: what the command does, its main options and the options of its groups."""
    groups = config_groups(_GROUPS)
    return (
        f"python -m lt_diffusion.prepare_data (ltd-prepare-data): {__doc__}\n"
        "Main options:\n"
        "  dataset=<name>  imbalance=<ir100 | native | ...>  paths.data_root=<dir>\n"
        "  (any other training override is accepted: python -m lt_diffusion.train --help)\n"
        "Example:\n"
        "  python -m lt_diffusion.prepare_data dataset=cifar10_lt imbalance=ir100\n\n"
        f"== Config groups (choose one option with group=option) ==\n{groups}\n"
    )


main = overrides_command("prepare_data", help_text, lambda args: run(args).print_summary())

if __name__ == "__main__":
    main()
