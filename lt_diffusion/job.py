"""One job of a table sweep (:mod:`lt_diffusion.tables.job`), started by ``ltd-table`` through a
Hydra multirun: ``python -m lt_diffusion.job --multirun manifest=<sweep>/manifest.json job=0,1``.
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
