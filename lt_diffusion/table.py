"""Reproduce a paper table with one command:

    python -m lt_diffusion.table table=cm_table2                        # here, one job at a time
    python -m lt_diffusion.table table=cm_table2 hydra/launcher=slurm \
        hydra.launcher.partition=gpu 'train_overrides=[trainer=gpu]'     # on a SLURM cluster

Everything is checked before any job starts: the table spec and every experiment it names
(each run's config is composed), the launcher against each run's trainer. Runs whose records
all exist are skipped, so running the command again launches nothing, and deleting one record
relaunches only that run. The jobs (train, then evaluate) go through a Hydra multirun of
:mod:`lt_diffusion.job`; afterwards the records are aggregated into the table (mean ± std over
seeds, best and second best marked, the published value and our difference beside each cell,
▲ / ▼ where a row differs from its block's baseline by a paired test over seeds, Holm-adjusted;
``table.view=diff`` for the differences ± their 95% interval), written as Markdown, LaTeX and
CSV under ``<output_dir>/tables/``. A failed run shows as failed
with the path of its log; it never stops the others.
"""

from __future__ import annotations

from lt_diffusion.tables.launch import run_from_command_line
from lt_diffusion.utils.command import hydra_command
from lt_diffusion.utils.lazy import moved

main = hydra_command("sweep", run_from_command_line)
# The pipeline moved to lt_diffusion.tables.launch: found there, with a warning, one release.
__getattr__ = moved(__name__, ("lt_diffusion.tables.launch",))

if __name__ == "__main__":
    main()
