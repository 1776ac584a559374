"""Where the project is and what it runs on: the config folder, the code version stamped into
checkpoints and records, the device a command runs on. The bottom of the package: it imports
nothing of the project (the commands' entry point is :mod:`lt_diffusion.utils.command`)."""

from __future__ import annotations

import subprocess
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
