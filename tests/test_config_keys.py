"""Config keys nothing reads are refused, naming the closest valid key; the keys shipped
configs set are all known."""

from __future__ import annotations

import pytest

from lt_diffusion.training.config_keys import check_known_keys, unknown_keys
from tests.conftest import compose_config


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
