"""Every config file composes, and bad names fail with Hydra's list of valid options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, compose_config

GROUPS = sorted(
    p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name not in ("hydra", "table")
)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def _resolve(cfg) -> dict:
    # paths.run_dir interpolates Hydra's runtime dir, which exists only inside a launched job.
    cfg.paths.run_dir = "/tmp/run"
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS if g != "eval" for o in _options(g)],
)
def test_every_group_option_composes_into_train(group: str, option: str) -> None:
    cfg = compose_config("train", [f"{group}={option}"])
    resolved = _resolve(cfg)
    assert resolved["run_name"]
    assert resolved["model"]["num_classes"] == resolved["dataset"]["num_classes"]


def test_train_config_has_the_design_groups() -> None:
    cfg = compose_config("train", [])
    for key in ("dataset", "imbalance", "method", "model", "diffusion", "sampler", "trainer"):
        assert key in cfg, key
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.offline is True


def test_sample_config_composes() -> None:
    cfg = compose_config("sample", ["checkpoint=x.ckpt"])
    assert cfg.sampler.sampler.steps == 50


@pytest.mark.parametrize("override", ["dataset=imagenet_nope", "method=nope", "model=nope"])
def test_unknown_names_list_the_valid_options(override: str) -> None:
    group = override.split("=")[0]
    with pytest.raises(MissingConfigException) as err:
        compose_config("train", [override])
    msg = str(err.value)
    assert f"Could not find '{group}/" in msg
    assert _options(group)[0] in msg  # Hydra lists the available options
