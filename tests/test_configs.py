"""Every config file composes, and bad names fail with Hydra's list of valid options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lt_diffusion.diffusion.schedule import SCHEDULE_KINDS
from lt_diffusion.training.config_keys import unknown_keys
from tests.conftest import CONFIG_DIR, compose_config

GROUPS = sorted(
    p.name
    for p in Path(CONFIG_DIR).iterdir()
    # objective: inside methods; prompt_sets: the concept analysis's prompt files, not a group
    if p.is_dir() and p.name not in ("hydra", "table", "objective", "prompt_sets")
)


def _options(group: str) -> list[str]:
    """Every option of a group, sub-folders included (``experiment=cm/cifar10_lt_ir100_cm``)."""
    root = Path(CONFIG_DIR) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


# Groups only configs/classify.yaml composes (the classification job), and its experiment rows.
CLASSIFY_GROUPS = ("augment", "capacity", "classifier", "loss")


def _classify_option(group: str, option: str) -> bool:
    return group in CLASSIFY_GROUPS or (group == "experiment" and option.startswith("classify/"))


# Options that are read with one dataset only: the concept-pair MLP sizes its embeddings from
# the concept-pair data's vocabularies.
COMPANIONS = {"model=concept_pair_mlp": ["dataset=concept_pairs"]}


def _resolve(cfg) -> dict:
    # paths.run_dir interpolates Hydra's runtime dir, which exists only inside a launched job.
    cfg.paths.run_dir = "/tmp/run"
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g in GROUPS
        if g not in ("eval", "analysis")
        for o in _options(g)
        if not _classify_option(g, o)
    ],
)
def test_every_group_option_composes_into_train(group: str, option: str) -> None:
    cfg = compose_config("train", [f"{group}={option}", *COMPANIONS.get(f"{group}={option}", [])])
    assert unknown_keys(cfg) == []  # every key it sets is one training reads
    resolved = _resolve(cfg)
    assert resolved["run_name"]
    assert resolved["model"]["num_classes"] == resolved["dataset"]["num_classes"]
    # The noise schedule a row names must exist (CM Table 6's scaled_linear once did not).
    assert resolved["diffusion"]["kind"] in SCHEDULE_KINDS
    assert instantiate(cfg.diffusion).T == resolved["diffusion"]["num_timesteps"]


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in _options(g) if _classify_option(g, o)],
)
def test_every_classification_option_composes_into_classify(group: str, option: str) -> None:
    from lt_diffusion.classification.config import check_config

    cfg = compose_config("classify", [f"{group}={option}"])
    if cfg.augment.rule != "none" and cfg.augment.generator.experiment is None:
        # The group leaves the generator and its name in the run name to the row.
        cfg.augment.generator.experiment = "cm/cifar100_lt_ir100_ddpm"
        cfg.augment.name = "ddpm"
    check_config(cfg)  # no unknown keys, a valid schedule and augmentation
    resolved = _resolve(cfg)
    assert resolved["task"] == "classify" and resolved["run_name"]
    assert resolved["classifier"]["model"]["num_classes"] == resolved["dataset"]["num_classes"]


def test_cm_table_rows_set_the_papers_budget() -> None:
    rows = [
        o
        for o in _options("experiment")
        if o.startswith("cm/cifar") and "budget" not in o and "overlap" not in o
    ]
    # Tables 2/3 (28), Table 7 ablations (2), Table 1 (4), E.2 (1), G.9 consistency models (4)
    assert len(rows) == 39
    for row in rows:
        cfg = compose_config("train", [f"experiment={row}"])
        distilled = cfg.method.name in ("cd", "cm_cd")  # G.9: no warm-up, one-step sampling
        assert cfg.model.ch == 128 and cfg.train.warmup_steps in (
            (0,) if distilled else (5000, 1000)
        )
        assert cfg.data.batch_size == 64 and cfg.sampler.sampler.steps == (1 if distilled else 50)
        assert row.split("/")[1] == f"{cfg.dataset.name}_{cfg.imbalance.name}_{cfg.method.name}"


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
