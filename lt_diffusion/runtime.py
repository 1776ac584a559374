"""Where the project is and what it runs on: the config folder, the code version stamped into
checkpoints and records, the device a command runs on and the commands' Hydra entry point.
Commands and libraries read these from here, never from each other."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import lt_diffusion

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def subset_tag(seed: Any) -> str:
    """The run-name part of a long-tailed subset drawn with another seed than the papers' 0
    (``imbalance.name: ir100-subset3``), so runs on different subsets never share a directory."""
    return "" if int(seed) == 0 else f"-subset{int(seed)}"


# Every composition of the project's configs imports this module (CONFIG_DIR) first.
OmegaConf.register_new_resolver("subset_tag", subset_tag, replace=True)


def code_version() -> str:
    """``git describe --always --dirty --tags`` of the source tree when it is a git checkout,
    else the installed package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return lt_diffusion.__version__


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def hydra_command(config_name: str, run: Callable[[Any], Any]) -> Callable[[], Any]:
    """A command's entry point: ``run`` on ``configs/<config_name>.yaml`` composed with the
    command line's overrides (``--help``, ``--multirun`` and shell completion included), with
    third-party noise filtered (Lightning's tips, the ``srun`` hint outside SLURM jobs, wandb's
    console output, dependencies' deprecation warnings: :mod:`lt_diffusion.utils.quiet`;
    ``-v`` or ``verbose=true`` keeps them). ``run`` is the task function (wrapped, so Hydra
    still names the job after the module that defines it; a launcher's job process filters
    too)."""
    import hydra

    from lt_diffusion.utils import quiet

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
