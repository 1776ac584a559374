"""Shared fixtures: composing the project's Hydra configs in-process."""

from __future__ import annotations

import os
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


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with overrides, as the command line would."""
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name=name, overrides=overrides)


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
