"""A command's terminal: third-party noise (Lightning's tips, the srun hint outside a SLURM job,
wandb's settings warnings, dependencies' deprecation warnings) filtered at the entry point, the
project's own warnings kept, and ``-v`` / ``verbose=true`` bringing everything back."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lt_diffusion.utils import quiet
from tests.conftest import ROOT

# What each filtered message looks like in a terminal.
NOISE = {
    "Lightning's tip": "litlogger",
    "the srun hint": "The `srun` command is available",
    "wandb's settings warning": "anonymous setting has no effect",
    "a dependency's deprecation warning": "is deprecated",
}
OWN_WARNING = "The resumed checkpoint cannot continue its random sequence"


def _command(args: list[str], tmp_path: Path) -> str:
    """``python -m lt_diffusion.<args>`` as a user on a machine with ``srun`` installed but no
    SLURM job runs it: its stdout and stderr together."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"  # on the PATH, never run: Lightning only looks for it
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTEST_", "WANDB_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(ROOT),
        WANDB_MODE="offline",
        LT_DIFFUSION_CACHE=str(tmp_path / "cache"),
    )
    env.pop(quiet.VERBOSE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture
def resumable(train_overrides, tmp_path: Path) -> list[str]:
    """A run one step in, whose checkpoint lacks the random state (as an older version wrote
    it): resuming it makes the project warn."""
    from lt_diffusion import train
    from lt_diffusion.training.rng import RNG_KEY
    from tests.conftest import compose_config

    overrides = train_overrides()
    cfg = compose_config("train", [*overrides, "train.max_steps=1"])
    # Where the command will find it: <paths.output_dir>/runs/<run_name> (configs/train.yaml).
    cfg.paths.run_dir = str(Path(cfg.paths.output_dir) / "runs" / cfg.run_name)
    train.run(cfg)
    ckpt = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    del state[RNG_KEY]
    torch.save(state, ckpt)
    return overrides


def test_training_shows_the_projects_warning_and_none_of_the_noise(resumable, tmp_path) -> None:
    out = _command(
        ["lt_diffusion.train", *resumable, "logger=wandb", "train.max_steps=2"], tmp_path
    )
    for what, text in NOISE.items():
        assert text not in out, f"{what} reached the terminal:\n{out[-4000:]}"
    assert OWN_WARNING in out
    assert out.count("Run directory:") == 1  # Lightning's lines once, not twice
    (log,) = (tmp_path / "outputs" / "runs").glob("*/train.log")
    assert "Run directory:" in log.read_text()  # the run's log file keeps them


@pytest.mark.slow
def test_verbose_brings_the_noise_back(resumable, tmp_path) -> None:
    args = ["lt_diffusion.train", *resumable, "logger=wandb", "train.max_steps=2", "-v"]
    out = _command(args, tmp_path)
    for what in ("Lightning's tip", "the srun hint", "wandb's settings warning"):
        assert NOISE[what] in out, what
    assert OWN_WARNING in out


def test_verbose_flags_are_taken_off_the_command_line(monkeypatch) -> None:
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    argv = ["ltd-train", "experiment=x", "verbose=true", "seed=1"]
    assert quiet.take_verbose(argv) and argv == ["ltd-train", "experiment=x", "seed=1"]
    argv = ["ltd-train", "-v"]
    assert quiet.take_verbose(argv) and argv == ["ltd-train"]
    argv = ["ltd-train", "verbose=false"]
    assert not quiet.take_verbose(argv) and argv == ["ltd-train"]
    assert os.environ[quiet.VERBOSE_ENV] == "0"  # passed on to the processes it starts


def test_the_filters_keep_the_projects_deprecations(monkeypatch) -> None:
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(quiet, "_installed", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        quiet.install()
        third_party = {"__name__": "torch.jit._script"}
        exec("import warnings; warnings.warn('x is deprecated', FutureWarning)", third_party)
        own = {"__name__": "lt_diffusion.models.x"}
        exec("import warnings; warnings.warn('y is deprecated', FutureWarning)", own)
        hint = "The `srun` command is available on your system but is not used. HINT: ..."
        exec(f"import warnings; warnings.warn({hint!r})", third_party)
    assert [str(w.message) for w in seen] == ["y is deprecated"]
