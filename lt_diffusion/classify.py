"""Train and evaluate one long-tailed classifier:
``python -m lt_diffusion.classify dataset=cifar100_lt imbalance=ir100 loss=ldam_drw capacity=cm``.

The run trains (resuming ``<run_dir>/checkpoints/last.ckpt`` when it exists), then writes the
test evaluation's record to ``<run_dir>/records/`` (docs/classification.md). Table rows under
``configs/experiment/classify/`` run through this same path from ``lt_diffusion.table``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lt_diffusion.runtime import CONFIG_DIR, prepare_training_process


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="classify")
def main(cfg: DictConfig) -> None:
    # Imported here: Lightning takes seconds to import, which --help and shell completion
    # (ltd-classify -sc query=bash, at every TAB) do not need.
    from lt_diffusion.classification.run import run

    prepare_training_process()
    run(cfg)


if __name__ == "__main__":
    main()
