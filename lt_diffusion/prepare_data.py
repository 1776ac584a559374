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
from pathlib import Path
from typing import TYPE_CHECKING

from lt_diffusion.utils.config import CONFIG_DIR, compose_config

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
    groups = "\n".join(
        f"  {g}: {', '.join(sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob('*.yaml')))}"
        for g in _GROUPS
    )
    return (
        f"python -m lt_diffusion.prepare_data (ltd-prepare-data): {__doc__}\n"
        "Main options:\n"
        "  dataset=<name>  imbalance=<ir100 | native | ...>  paths.data_root=<dir>\n"
        "  (any other training override is accepted: python -m lt_diffusion.train --help)\n"
        "Example:\n"
        "  python -m lt_diffusion.prepare_data dataset=cifar10_lt imbalance=ir100\n\n"
        f"== Config groups (choose one option with group=option) ==\n{groups}\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(help_text())
        return
    flags = [a for a in args if a.startswith("-")]
    if flags:  # not a Hydra app: Hydra's flags (--hydra-help, --multirun) mean nothing here
        sys.exit(
            f"prepare_data takes training overrides (key=value) only, not {' '.join(flags)}; "
            "see python -m lt_diffusion.prepare_data --help"
        )
    run(args).print_summary()


if __name__ == "__main__":
    main()
