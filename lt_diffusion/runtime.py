"""Where the project is and what it runs on: the config folder, the code version stamped into
checkpoints and records, and the device a command runs on. Commands and libraries read these
from here, never from each other."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

import lt_diffusion

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


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


def prepare_training_process() -> None:
    """Process settings of the commands that train (``ltd-train``, ``ltd-classify``): wandb's
    console output off and TF32 matmuls where the GPU has them."""
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_float32_matmul_precision("high")
