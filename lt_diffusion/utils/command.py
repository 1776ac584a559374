"""The commands' Hydra entry point: every ``ltd-*`` command is ``main = hydra_command(...)``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from lt_diffusion.runtime import CONFIG_DIR
from lt_diffusion.utils import quiet


def hydra_command(config_name: str, run: Callable[[Any], Any]) -> Callable[[], Any]:
    """A command's entry point: ``run`` on ``configs/<config_name>.yaml`` composed with the
    command line's overrides (``--help``, ``--multirun`` and shell completion included), with
    third-party noise filtered (Lightning's tips, the ``srun`` hint outside SLURM jobs, wandb's
    console output, dependencies' deprecation warnings: :mod:`lt_diffusion.utils.quiet`;
    ``-v`` or ``verbose=true`` keeps them). ``run`` is the task function (wrapped, so Hydra
    still names the job after the module that defines it; a launcher's job process filters
    too)."""
    import hydra

    @functools.wraps(run)
    def task(cfg: Any) -> Any:
        quiet.install()
        quiet.one_lightning_handler()  # Hydra has configured logging by now
        return run(cfg)

    app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)

    def main() -> Any:
        quiet.take_verbose(sys.argv)
        quiet.install()
        return app()

    return main
