"""Train one run: ``python -m lt_diffusion.train dataset=cifar10_lt imbalance=ir100 method=ddpm``.

Everything that can be checked is checked before the first step (unknown config keys, dataset
files, ratio, the resume checkpoint). The run directory is derived from the config, so
launching the same run again resumes it from ``<run_dir>/checkpoints/last.ckpt``, exactly
(the checkpoint holds every random state). One training at a time writes a run directory: it
holds ``<run_dir>/train.lock`` (:mod:`lt_diffusion.utils.runlock`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lt_diffusion.utils.command import hydra_command

__all__ = ["main", "run"]


def run(cfg: DictConfig) -> Any:
    """:func:`lt_diffusion.training.run.run`, imported when called: torch and Lightning take seconds
    to import, which ``--help`` and shell completion (at every TAB) do not need."""
    from lt_diffusion.training.run import run as run_command

    return run_command(cfg, launch_files=True)


main = hydra_command("train", run)

if __name__ == "__main__":
    main()
