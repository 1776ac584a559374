"""The commands' Hydra entry point: every ``ltd-*`` command is ``main = hydra_command(...)``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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


def config_groups(groups: Sequence[str]) -> str:
    """The options of the config ``groups``, a line each (for a plain command's ``--help``)."""
    folder = Path(CONFIG_DIR)
    return "\n".join(
        f"  {g}: {', '.join(sorted(p.stem for p in (folder / g).glob('*.yaml')))}" for g in groups
    )


def overrides_command(
    name: str, help_text: Callable[[], str], run: Callable[[list[str]], Any]
) -> Callable[[Sequence[str] | None], None]:
    """The entry point of a command that takes ``key=value`` overrides but is not a Hydra app
    (it composes configs itself): ``--help`` prints ``help_text()``, any other flag (Hydra's
    ``--multirun``, ``--hydra-help``) is refused with where to look."""

    def main(argv: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if argv is None else argv)
        if any(a in ("-h", "--help") for a in args):
            print(help_text())
            return
        flags = [a for a in args if a.startswith("-")]
        if flags:
            sys.exit(
                f"{name} takes key=value overrides only, not {' '.join(flags)}; see "
                f"python -m lt_diffusion.{name} --help"
            )
        run(args)

    return main
