"""Train and evaluate one long-tailed classifier:
``python -m lt_diffusion.classify dataset=cifar100_lt imbalance=ir100 loss=ldam_drw capacity=cm``.

The run trains (resuming ``<run_dir>/checkpoints/last.ckpt`` when it exists), then writes the
test evaluation's record to ``<run_dir>/records/`` (docs/classification.md). Table rows under
``configs/experiment/classify/`` run through this same path from ``lt_diffusion.table``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lt_diffusion.utils.command import hydra_command

__all__ = ["main", "run"]


def run(cfg: DictConfig) -> Any:
    """:func:`lt_diffusion.classification.run.run`, imported when called: torch and Lightning
    take seconds to import, which ``--help`` and shell completion (at every TAB) do not need."""
    from lt_diffusion.classification.run import run as run_command

    return run_command(cfg, launch_files=True)


main = hydra_command("classify", run)

if __name__ == "__main__":
    main()
