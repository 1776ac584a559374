"""Evaluate a checkpoint (EMA weights) or a folder of generated images under a protocol and
write one record: ``python -m lt_diffusion.evaluate checkpoint=... eval=cm_paper``.

Under torchrun (``torchrun --nproc_per_node N -m lt_diffusion.evaluate ...``) generation and
feature extraction are split across the processes; the record is the same as with one.
"""

from __future__ import annotations

from lt_diffusion.evaluation.run import RecordSaveError, run
from lt_diffusion.utils.command import hydra_command

__all__ = ["RecordSaveError", "main", "run"]


main = hydra_command("evaluate", run)

if __name__ == "__main__":
    main()
