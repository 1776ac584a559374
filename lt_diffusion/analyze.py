"""Run one of the papers' diagnostic analyses on a trained checkpoint and write its record
(JSON) and plot (PNG) next to the run:

    python -m lt_diffusion.analyze analysis=pruning checkpoint=outputs/runs/<run>/checkpoints/last.ckpt

Analyses (configs/analysis/): ``pruning`` (CM paper, Fig. 1(b)), ``imba_distance`` (IMBA loss),
``feature_overlap`` (CORAL), ``gradient_dominance`` (CM paper, Theorem 2.1),
``concept_dominance`` (DominanceBench; Stable Diffusion backbones). The record goes to
``<run_dir>/analyses/<analysis>[-theta_g].json``, the plot beside it. See docs/analyses.md.
"""

from __future__ import annotations

from lt_diffusion.analysis.run import run
from lt_diffusion.utils.command import hydra_command

__all__ = ["main", "run"]

main = hydra_command("analyze", run)

if __name__ == "__main__":
    main()
