"""Shared fixtures: composing the project's Hydra configs in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(ROOT / "configs")

# Keep experiment loggers and caches inside the test's temporary space.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (-n N) every worker computes with one CPU thread: N workers of one thread
# each share the cores instead of N x cores threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with overrides, as the command line would."""
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name=name, overrides=overrides)


def python_process(args: list[str]) -> subprocess.Popen:
    """``python <args>`` in the repository root (wandb offline, unbuffered), its stdout and
    stderr together in ``proc.stdout``: a command run as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# A seconds-long evaluation: the quick protocol on 10 generated images (no split or class
# comparisons), 3 real images per class, all four metrics at tiny sizes, on the CPU.
TINY_EVAL = {
    "eval": "quick",
    "eval.overall.generated": 10,
    "eval.overall.real_per_class": 3,
    "eval.per_split.generated": 0,
    "eval.per_class.generated": 0,
    "eval.metrics": "[fid,kid,precision,recall]",
    "eval.pr_k": 2,
    "eval.kid_subset_size": 5,
    "eval.kid_subsets": 3,
    "eval.batch_size": 10,
    "eval.sampler.steps": 3,
    "device": "cpu",
}


def tiny_eval(changes: dict[str, Any] | None = None) -> list[str]:
    """Evaluation overrides of :data:`TINY_EVAL`, ``changes`` replacing or adding settings."""
    return [f"{k}={v}" for k, v in {**TINY_EVAL, **(changes or {})}.items()]


def assert_same_state(a: Any, b: Any) -> None:
    """Two modules hold the same ``state_dict``: equal tensors, equal extra states."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        same = torch.equal(value, sb[key]) if torch.is_tensor(value) else value == sb[key]
        assert same, key


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tests of tiny tensors: as fast, and several times faster than
    two when other processes compete for the cores (idle worker threads spin). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sched():
    """Ho et al.'s linear schedule (T = 1000) in float64, for checks against closed forms."""
    from lt_diffusion.diffusion import NoiseSchedule

    return NoiseSchedule(1000).double()


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    """A data root holding a tiny CIFAR-10 in its real on-disk (pickle) format."""
    from tests.fakedata import write_cifar10

    root = tmp_path / "data"
    write_cifar10(root / "cifar10", n_per_class=20, test_per_class=4, seed=0)
    return root


@pytest.fixture
def train_overrides(tiny_cifar: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """Overrides for a seconds-long CPU training run on the tiny CIFAR-10."""

    def make(*extra: str) -> list[str]:
        return [
            "dataset=cifar10_lt",
            "imbalance=ir10",
            "model=unet_tiny",
            "trainer=cpu",
            "logger=csv",
            f"paths.data_root={tiny_cifar}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            "dataset.source.download=false",
            "data.batch_size=8",
            "train.warmup_steps=5",
            "train.ckpt_every=5",
            "train.grid_every=0",
            "train.grid_per_class=2",
            "train.grid_steps=3",
            "train.log_every=5",
            *extra,
        ]

    return make
