"""Train one run: ``python -m lt_diffusion.train dataset=cifar10_lt imbalance=ir100 method=ddpm``.

Everything that can be checked is checked before the first step (unknown config keys, dataset
files, ratio, the resume checkpoint). The run directory is derived from the config, so
launching the same run again resumes it from ``<run_dir>/checkpoints/last.ckpt``, exactly
(the checkpoint holds every random state). One training at a time writes a run directory: it
holds ``<run_dir>/train.lock`` (:mod:`lt_diffusion.utils.runlock`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lt_diffusion.runtime import CONFIG_DIR, prepare_training_process

__all__ = ["main", "run"]


def run(cfg: DictConfig) -> Path:
    """Train the run ``cfg`` describes (:func:`lt_diffusion.training.run.run`)."""
    # Imported here: torch and Lightning take seconds to import, which --help and shell
    # completion (ltd-train -sc query=bash, at every TAB) do not need.
    from lt_diffusion.training.run import run as train

    return train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    prepare_training_process()
    run(cfg)


if __name__ == "__main__":
    main()
