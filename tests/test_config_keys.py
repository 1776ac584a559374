"""Config keys nothing reads are refused, naming the closest valid key; the keys shipped
configs set are all known; the imbalance group's run names follow the ratio actually used."""

from __future__ import annotations

from pathlib import Path

import pytest

from lt_diffusion.training.config_keys import check_known_keys, unknown_keys
from tests.conftest import CONFIG_DIR, compose_config


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "+train.max_step=5",
            "train.max_step is not a key any config defines; did you mean train.max_steps?",
        ),
        (
            "+data.batchsize=3",
            "data.batchsize is not an argument of lt_diffusion.data.LongTailDataModule; did you mean data.batch_size?",
        ),
        (
            "+optimizer.weight_decya=0.1",
            "optimizer.weight_decya is not an argument of torch.optim.Adam; did you mean optimizer.weight_decay?",
        ),
        ("+seeed=1", "seeed is not a key any config defines; did you mean seed?"),
        ("+method.data_sampelr=class_balanced", "did you mean method.data_sampler?"),
        ("+method.objective.cond_drop_mod=sample", "did you mean method.objective.cond_drop_mode?"),
        (
            "+trainer.max_step=3",
            "trainer.max_step is not an argument of lightning.Trainer; did you mean trainer.max_steps?",
        ),
        ("+imbalance.ration=50", "did you mean imbalance.ratio?"),
        (
            "+callbacks.checkpoint.every_n_train_step=3",
            "callbacks.checkpoint.every_n_train_step is not an argument of "
            "lt_diffusion.training.callbacks.RunCheckpoint; did you mean "
            "callbacks.checkpoint.every_n_train_steps?",
        ),
        ("+callbacks.sample_grid.per_clas=3", "did you mean callbacks.sample_grid.per_class?"),
        ("+callbacks.lr=3", "callbacks.lr is not a key any config defines"),
    ],
)
def test_a_typo_is_refused_with_the_closest_key(override: str, message: str) -> None:
    cfg = compose_config("train", [override])
    with pytest.raises(ValueError, match="Unknown config keys") as err:
        check_known_keys(cfg)
    assert message in str(err.value)


def test_keys_set_only_by_some_configs_are_known() -> None:
    # Keys a method or an experiment file adds are valid under any choice of those groups:
    # code reads them with .get (e.g. method.requires_init_from, set by fine-tuning methods).
    cfg = compose_config("train", ["method=ddpm", "+method.requires_init_from=false"])
    assert unknown_keys(cfg) == []
    cfg = compose_config("train", ["experiment=cm/cifar10_lt_ir100_cm", "optimizer.lr=1e-4"])
    assert unknown_keys(cfg) == []


def test_a_callback_added_on_the_command_line_is_known_and_its_arguments_checked() -> None:
    lr = "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor"
    assert unknown_keys(compose_config("train", [lr, "+callbacks.lr.logging_interval=step"])) == []
    typo = compose_config("train", [lr, "+callbacks.lr.logging_intervl=step"])
    assert unknown_keys(typo) == [
        "callbacks.lr.logging_intervl is not an argument of "
        "lightning.pytorch.callbacks.LearningRateMonitor; did you mean callbacks.lr.logging_interval?"
    ]
    assert unknown_keys(compose_config("train", ["callbacks=none"])) == []


def _imbalance_options() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "imbalance").glob("*.yaml"))


@pytest.mark.parametrize("option", _imbalance_options())
def test_shipped_imbalance_names_are_unchanged(option: str) -> None:
    # Run directories, table specs and docs name runs by these.
    assert compose_config("train", [f"imbalance={option}"]).imbalance.name == option


@pytest.mark.parametrize(
    "overrides,name",
    [
        (["imbalance=ir100", "imbalance.ratio=50"], "ir50"),
        (["imbalance=ir10", "imbalance.ratio=20"], "ir20"),
        (["imbalance=step_ir100", "imbalance.ratio=10"], "step_ir10"),
    ],
)
def test_a_ratio_override_names_the_run_by_that_ratio(overrides: list[str], name: str) -> None:
    cfg = compose_config("train", ["dataset=cifar10_lt", "method=ddpm", *overrides])
    assert cfg.imbalance.name == name
    assert cfg.run_name == f"cifar10_lt-{name}-ddpm-seed0"
