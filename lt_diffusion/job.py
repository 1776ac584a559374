"""One job of a table sweep: train a run (resuming it) and write every record the table needs
from it, in one process group. Started by :mod:`lt_diffusion.table` through a Hydra multirun:

    python -m lt_diffusion.job --multirun manifest=<sweep>/manifest.json job=0,1,2 \
        hydra/launcher=slurm

Under SLURM each task is one training process (Lightning reads its rank from SLURM); with the
local launcher a multi-device job starts itself again under ``torchrun``. A failing job writes
``<run_dir>/failed.json`` (error, traceback, the path of its log) and, when it is alone in its
process group, returns normally so that the other jobs of the sweep go on. A SIGTERM (SLURM
requeue, preemption, time limit) is not a failure: the training loop saves ``last.ckpt`` and
the process exits without a result, and the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

from lt_diffusion.tables.job import run
from lt_diffusion.utils.command import hydra_command
from lt_diffusion.utils.lazy import moved

main = hydra_command("job", run)
# The table pipeline moved to lt_diffusion.tables.job: found there, with a warning, for one release.
__getattr__ = moved(__name__, ("lt_diffusion.tables.job",))

if __name__ == "__main__":
    main()
