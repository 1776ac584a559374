"""``eval.repeats=k``: k generation sets of one checkpoint (other noise, the same real set), each
metric's mean and std over them in one record; one set is the ordinary evaluation, its digest
unchanged; tables state the noise per column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lt_diffusion.evaluation.identity import evaluation_identity
from lt_diffusion.evaluation.repeats import STRIDE, noise_seeds
from lt_diffusion.utils.config import compose_config

METRICS = ("sw", "mmd", "mode_precision", "mode_coverage", "borrowing")


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    from lt_diffusion import train

    out = tmp_path_factory.mktemp("repeats")
    cfg = compose_config(
        "train",
        ["experiment=toy/toy2d_ddpm", "imbalance=ir1", f"paths.output_dir={out}",
         "train.max_steps=30", "dataset.source.n_per_class=200", "logger=none",
         "train.grid_per_class=2"],
    )  # fmt: skip
    cfg.paths.run_dir = str(out / "run")
    train.run(cfg)
    return out / "run" / "checkpoints" / "last.ckpt"


def _evaluate(ckpt: Path, *extra: str) -> dict:
    from lt_diffusion import evaluate

    cfg = compose_config(
        "evaluate",
        ["eval=toy", f"checkpoint={ckpt}", "eval.per_class.generated=40",
         "eval.per_class.real_per_class=40", "eval.sampler.steps=4", "track=false", *extra],
    )  # fmt: skip
    return evaluate.run(cfg)


def test_repeats_record_the_mean_and_std_over_generation_sets(toy_checkpoint: Path) -> None:
    one = _evaluate(toy_checkpoint)
    three = _evaluate(toy_checkpoint, "eval.repeats=3")
    rep = three["repeats"]
    assert rep["k"] == 3 and rep["noise_seeds"] == [0, STRIDE, 2 * STRIDE]
    for section, name in (("overall", None), ("per_split", "few"), ("per_class", "class_009")):
        entry = three["metrics"][section] if name is None else three["metrics"][section][name]
        single = one["metrics"][section] if name is None else one["metrics"][section][name]
        sets = rep["values"][section] if name is None else rep["values"][section][name]
        for metric in METRICS:
            got = np.array(sets[metric])
            assert got[0] == pytest.approx(single[metric], abs=1e-12)  # set 0: the ordinary one
            assert entry[metric] == pytest.approx(got.mean())
            assert entry[f"{metric}_std"] == pytest.approx(got.std(ddof=1))
        assert len(set(sets["sw"])) == 3  # other noise, other points
    # The real set is the same: the counts compared are too.
    assert three["metrics"]["per_class"]["class_000"]["n_real"] == 40
    assert three["identity"]["digest"] != one["identity"]["digest"]


def test_one_repeat_keeps_the_digest_of_records_made_before_the_setting() -> None:
    train = compose_config("train", ["experiment=toy/toy2d_ddpm"])
    protocol = compose_config("evaluate", ["eval=toy"]).eval
    before = OmegaConf.to_container(protocol, resolve=True)
    del before["repeats"]
    kw = {"train_config": train, "sampler": None, "guidance": 0.0, "theta_g_only": False}
    assert (
        evaluation_identity(protocol=protocol, **kw)["digest"]
        == evaluation_identity(protocol=before, **kw)["digest"]
    )


def test_bad_repeats_are_refused_before_any_work(toy_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"eval.repeats=0: give the number of generation sets"):
        noise_seeds(0, 0)
    with pytest.raises(ValueError, match="eval.repeats=0"):
        _evaluate(toy_checkpoint, "eval.repeats=0")
    from lt_diffusion import evaluate

    cfg = compose_config("evaluate", ["eval=quick", f"images={tmp_path}", "eval.repeats=2"])
    with pytest.raises(ValueError, match="a folder of images is one set"):
        evaluate.run(cfg)
