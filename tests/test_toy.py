"""The synthetic benchmark: its data (a source of points with known densities, served by the
long-tail datamodule), the MLP denoiser with the U-Net's hooks, generation of points, every
method on it, and a quick version of the benchmark through ``lt_diffusion.train`` and
``lt_diffusion.evaluate`` whose metrics must tell a trained model from one trained on shuffled
labels."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lt_diffusion.data import LongTailDataModule, longtail_counts, split_map
from lt_diffusion.data.toy import ToySource, ring_mixture
from lt_diffusion.diffusion import (
    DDIMSampler,
    NoiseSchedule,
    balanced_labels,
    gather_order,
    generate,
    generate_vectors,
)
from lt_diffusion.methods import group_expert_lora
from lt_diffusion.models import MLPDenoiser, UNet
from lt_diffusion.models.lowrank import LowRankMixin, reserve_capacity
from tests.conftest import CONFIG_DIR, compose_config

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))
# Methods that cannot apply to points, and the words their refusal must say.
REFUSED = {
    "ada": "ADA does not apply",  # image augmentation
    "cm_sd_lora": "StableDiffusionBackbone",  # Stable Diffusion's LoRA form of CM
    "imba_captions": "text-to-image backbone",  # IMBA per concept token of multi-concept captions
}
DISTILLED = {"cd", "cm_cd"}  # consistency distillation: a trained teacher first


def small_source(**kw) -> ToySource:
    return ToySource(**{"n_per_class": 200, "n_reference": 40, **kw})


def test_the_source_is_deterministic_scaled_and_balanced() -> None:
    a, b = small_source().load("train"), small_source().load("train")
    np.testing.assert_array_equal(a.points, b.points)
    assert a.points.dtype == np.float32 and a.points.shape == (2000, 2)
    assert np.abs(a.points).max() < 0.95  # inside the samplers' [-1, 1] clamp
    assert np.bincount(a.labels).tolist() == [200] * 10
    ref = small_source().load("test")  # another stream: fresh draws, not the training pool
    assert np.bincount(ref.labels).tolist() == [40] * 10
    assert not np.isin(ref.points[:, 0], a.points[:, 0]).any()
    other = small_source(seed=1).load("train")
    assert not np.array_equal(other.points, a.points)
    high = small_source(dim=16, lift=0.3, std=0.025).load("train")
    assert high.points.shape == (2000, 16) and np.abs(high.points).max() < 0.95


def test_the_layout_refuses_overlapping_or_clamped_modes() -> None:
    with pytest.raises(ValueError, match="lower dataset.source.std"):
        ring_mixture(num_classes=10, modes_per_class=2, std=0.05)
    with pytest.raises(ValueError, match=r"clamp to \[-1, 1\]"):
        ring_mixture(num_classes=4, radius=0.95, std=0.03)
    with pytest.raises(ValueError, match="lift needs dim > 2"):
        ring_mixture(num_classes=4, lift=0.2)


def test_the_datamodule_serves_points_as_they_are() -> None:
    source = small_source()
    dm = LongTailDataModule(
        source, image_size=None, num_classes=10, channels=2, ratio=100, hflip=False,
        batch_size=64, seed=3,
    )  # fmt: skip
    dm.setup()
    counts = longtail_counts("exp", 200, 10, 100)  # LDAM's rule, class 0 the head
    assert dm.class_counts == counts and dm.splits == split_map(counts, "thirds")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (64, 2) and y.shape == (64,)
    pool = source.load("train")
    for point, label in zip(x.numpy(), y.numpy()):  # the stored points, unscaled, unflipped
        row = np.flatnonzero((pool.points == point).all(1))
        assert len(row) == 1 and pool.labels[row[0]] == label
    ref, ref_y = dm.reference_set()
    assert ref.dtype == torch.float32 and ref.shape == (400, 2)
    assert torch.bincount(ref_y).tolist() == [40] * 10
    info = dm.info()
    assert info["image_size"] is None and info["channels"] == 2
    assert "training points" in dm.summary()


@pytest.mark.parametrize("bad", [{"image_size": 32}, {"hflip": True}])
def test_the_datamodule_refuses_image_options_for_points(bad: dict) -> None:
    kw = {"image_size": None, "hflip": False, **bad}
    with pytest.raises(ValueError, match="dataset.image_size=null and dataset.hflip=false"):
        LongTailDataModule(small_source(), num_classes=10, channels=2, **kw)


def test_the_mlp_has_the_unets_hooks() -> None:
    torch.manual_seed(0)
    model = MLPDenoiser(dim=2, num_classes=5, ch=16, ch_mult=[1, 2])
    x, t = torch.randn(6, 2), torch.randint(0, 1000, (6,))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    eps = model(x, t, y)
    assert eps.shape == (6, 2) and model.null_label == 5 and model.in_channels == 2
    assert not torch.equal(model(x, t), eps)  # y=None is the null label, not class 0
    assert torch.equal(model(x, t), model(x, t, torch.full_like(y, 5)))
    eps2, h_mid = model(x, t, y, return_bottleneck=True)
    assert torch.equal(eps2, eps) and h_mid.shape == (6, 16 * 2)  # CORAL: ch * ch_mult[-1]
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.randn(6, 2, 4, 4), t, y)

    # CM's capacity reservation and Group-Expert LoRA decompose the up half's Linear layers.
    up_linears = sum(type(m) is nn.Linear for m in model.up.modules())
    with torch.no_grad():
        reserved = reserve_capacity(MLPDenoiser(2, 5, ch=16, ch_mult=[1, 2]), 0.1, "up")
        reserved.load_state_dict(model.state_dict(), strict=False)
        assert sum(isinstance(m, LowRankMixin) for m in reserved.up.modules()) == up_linears
        torch.testing.assert_close(reserved(x, t, y), eps)  # B = 0: the plain model at start
        experts = group_expert_lora(MLPDenoiser(2, 5, ch=16, ch_mult=[1, 2]), 0.1, "up")
        assert sum(isinstance(m, LowRankMixin) for m in experts.up.modules()) == up_linears
        assert experts(x, t, y).shape == (6, 2)


def test_image_and_point_backbones_refuse_each_others_data() -> None:
    with pytest.raises(ValueError, match="use a U-Net"):
        MLPDenoiser(dim=3, num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="use model=mlp"):
        UNet(image_size=None, in_channels=2, ch=32, ch_mult=[1])


def test_points_are_generated_deterministically_whatever_the_split() -> None:
    torch.manual_seed(0)
    model = MLPDenoiser(dim=2, num_classes=3, ch=16)
    sampler = DDIMSampler(NoiseSchedule(), steps=4, clip_denoised=True)
    labels = balanced_labels(3, 4)
    kw = {"seed": 7, "batch_size": 5, "guidance": 1.0}
    full = generate_vectors(model, sampler, labels, **kw)
    assert full.dtype == torch.float32 and full.shape == (12, 2) and full.abs().max() <= 1.0
    parts = [generate_vectors(model, sampler, labels, rank=r, world_size=2, **kw) for r in (0, 1)]
    torch.testing.assert_close(gather_order(parts, 12, 5), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generate_vectors"):
        generate(model, sampler, labels, image_shape=(2, 1, 1), **kw)
    unet = UNet(image_size=8, in_channels=1, ch=32, ch_mult=[1], attn_resolutions=[])
    with pytest.raises(ValueError, match="not a model of vectors"):
        generate_vectors(unet, sampler, labels, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_step_on_points_or_refuses_clearly(method: str) -> None:
    from lt_diffusion.runs.build import (
        build_datamodule,
        build_model,
        build_objective,
        build_schedule,
    )

    cfg = compose_config(
        "train",
        ["experiment=toy/toy2d_ddpm", f"method={method}", "dataset.source.n_per_class=200",
         "data.batch_size=32"],
    )  # fmt: skip

    def one_step() -> torch.nn.Module:
        dm = build_datamodule(cfg)
        dm.setup()
        torch.manual_seed(0)
        model, objective, schedule = build_model(cfg), build_objective(cfg), build_schedule(cfg)
        objective.setup(dm.class_counts, seed=0)
        if method in DISTILLED:  # the teacher train.init_from names: here a copy of the model
            cd = next(m for m in objective.modules() if hasattr(m, "set_networks"))
            cd.set_networks(copy.deepcopy(model), model)
        else:
            objective.bind(model, schedule)  # as the training module does
        x, y = next(iter(dm.train_dataloader()))
        objective.cond_drop_prob = 0.0  # a conditional batch, so class terms (CBDM, CORAL) run
        for m in objective.modules():
            if hasattr(m, "cond_drop_prob"):
                m.cond_drop_prob = 0.0
        out = objective(model, x, y, schedule)
        assert math.isfinite(float(out.loss)), method
        out.loss.backward()
        return model

    if method in REFUSED:  # before the first step
        with pytest.raises((ValueError, TypeError), match=REFUSED[method]):
            one_step()
        return
    model = one_step()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), method


def _train_and_evaluate(out: Path, tag: str, overrides: list[str]) -> dict:
    from lt_diffusion import evaluate, train

    cfg = compose_config(
        "train",
        ["experiment=toy/toy2d_ddpm", "imbalance=ir1", "seed=0", f"tag=-{tag}",
         f"paths.output_dir={out}", "train.max_steps=300", "train.grid_per_class=5",
         # the benchmark draws no scatter per run; this one does (the engine's own scatter)
         "callbacks.sample_grid={_target_:lt_diffusion.training.callbacks.SampleGrid}",
         *overrides],
    )  # fmt: skip
    run_dir = out / "runs" / str(cfg.run_name)
    cfg.paths.run_dir = str(run_dir)
    train.run(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert (run_dir / "samples" / "latest.png").is_file()  # the scatter of samples
    ecfg = compose_config(
        "evaluate",
        ["eval=toy", f"checkpoint={ckpt}", "eval.per_class.generated=200",
         "eval.per_class.real_per_class=200", "eval.sampler.steps=20",
         f"data_root={out / 'data'}"],  # as a table's job passes it (generated data: unused)
    )  # fmt: skip
    record = evaluate.run(ecfg)
    assert record is not None
    return record


def test_quick_benchmark_tells_a_trained_model_from_one_trained_on_shuffled_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One seed, 300 steps, IR 1: the quick version of table=toy2d_methods. A model trained on
    the true labels puts its points on its own class's modes; one trained on shuffled labels
    learns the marginal, so every class's points land on the other classes' modes."""
    from lt_diffusion.evaluation.record import record_filename
    from lt_diffusion.records.base import read_record
    from lt_diffusion.tables.aggregate import metric_entry

    good = _train_and_evaluate(tmp_path, "good", [])
    load = ToySource.load

    def shuffled(self: ToySource, split: str):
        arrays = load(self, split)
        if split == "train":
            np.random.default_rng(0).shuffle(arrays.labels)
        return arrays

    monkeypatch.setattr(ToySource, "load", shuffled)
    broken = _train_and_evaluate(tmp_path, "shuffled", [])
    monkeypatch.undo()

    for where in ("overall", "per_split.many", "per_split.few"):
        g = {m: metric_entry(good, f"{where}.{m}")[0] for m in ("sw", "mmd", "borrowing")}
        b = {m: metric_entry(broken, f"{where}.{m}")[0] for m in ("sw", "mmd", "borrowing")}
        g_prec = metric_entry(good, f"{where}.mode_precision")[0]
        b_prec = metric_entry(broken, f"{where}.mode_precision")[0]
        assert g_prec > 0.5 and b_prec < 0.25, (where, g_prec, b_prec)
        assert g["borrowing"] < 0.1 and b["borrowing"] > 0.3, (where, g, b)
        assert g["sw"] < 0.5 * b["sw"] and g["mmd"] < 0.5 * b["mmd"], (where, g, b)

    # The record: the image records' schema and place, split values the means of their classes.
    path = Path(good["checkpoint"]["path"]).parent.parent / "records"
    name = record_filename("toy", "ddim20", 0.0, False, good["identity"]["digest"])
    assert read_record(path / name)["metrics"] == good["metrics"]
    splits = good["dataset"]["splits"]
    few = [e for k, e in good["metrics"]["per_class"].items() if splits[int(k[6:])] == "few"]
    few_entry = good["metrics"]["per_split"]["few"]
    assert few_entry["borrowing"] == pytest.approx(np.mean([e["borrowing"] for e in few]))
    assert few_entry["n_generated"] == 200 * len(few)
    assert good["extractors"] == {} and good["reference"]["origin"] == "dataset"


def test_an_image_protocol_on_points_names_the_toy_protocol(tmp_path: Path) -> None:
    from lt_diffusion import evaluate, train

    cfg = compose_config(
        "train",
        ["experiment=toy/toy2d_ddpm", f"paths.output_dir={tmp_path}", "train.max_steps=1",
         "dataset.source.n_per_class=200"],
    )  # fmt: skip
    cfg.paths.run_dir = str(tmp_path / "run")
    train.run(cfg)
    ecfg = compose_config(
        "evaluate", ["eval=quick", f"checkpoint={tmp_path / 'run/checkpoints/last.ckpt'}"]
    )
    with pytest.raises(ValueError, match="eval=toy"):
        evaluate.run(ecfg)


def shared_source(**kw) -> ToySource:
    cfg = compose_config("train", ["experiment=toy/toy2d_ddpm", "dataset=toy2d_shared"])
    args = {k: v for k, v in cfg.dataset.source.items() if not k.startswith("_")}
    return ToySource(**{**args, "n_per_class": 1000, "n_reference": 40, "n_validation": 40, **kw})


@pytest.mark.parametrize("ratio", [100, 1])
def test_the_transfer_variants_counts_and_missed_sub_modes_are_exact(ratio: int) -> None:
    """Every class gets LDAM's count, and the sub-modes its training points miss are exactly
    its hidden ones, whatever the long-tailed draw."""
    source = shared_source()
    mixture, K = source.mixture, source.mixture.modes_per_class
    assert source.training_modes.sum(1).tolist() == [4] * 6 + [2] * 4
    for subset in range(5):
        dm = LongTailDataModule(
            source, image_size=None, num_classes=10, channels=2, ratio=ratio, hflip=False,
            subset_seed=subset,
        )  # fmt: skip
        dm.setup()
        assert dm.class_counts == longtail_counts("exp", 1000, 10, ratio)
        hit = mixture.hit_mode(dm.train_images.numpy().astype(np.float64))
        labels = dm.train_labels.numpy()
        for c in range(10):
            seen = np.zeros(K, dtype=bool)
            own = hit[(labels == c) & (hit >= c * K) & (hit < (c + 1) * K)] - c * K
            seen[own] = True
            assert (seen == source.training_modes[c]).all(), (ratio, subset, c)
    # The references are drawn from the full densities: every sub-mode.
    ref = source.load("test")
    for c in range(10):
        hits = mixture.hit_mode(ref.points[ref.labels == c].astype(np.float64))
        assert set(hits[hits >= 0] - c * K) == set(range(K))


def test_the_transfer_variant_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="would miss every"):
        shared_source(hidden=[0] * 9 + [4])
    with pytest.raises(ValueError, match="one count per class"):
        shared_source(hidden=[1, 1])
    with pytest.raises(ValueError, match="constellation layout"):
        small_source(hidden=[1] * 10)
    # A tail class of 2 points cannot show its 2 training sub-modes every time: refused
    # before training, never silently missing more than it hides.
    tiny = shared_source(n_per_class=200)
    refused = 0
    for subset in range(10):
        dm = LongTailDataModule(
            tiny, image_size=None, num_classes=10, channels=2, ratio=100, hflip=False,
            subset_seed=subset,
        )  # fmt: skip
        try:
            dm.setup()
        except ValueError as err:
            assert "miss more sub-modes than" in str(err)
            refused += 1
    assert refused > 0


def test_the_validation_draws_are_fresh_and_never_the_test_draws() -> None:
    from lt_diffusion.evaluation.toy import reference_points

    source = small_source(n_validation=40)
    val, test, train = (source.load(s) for s in ("validation", "test", "train"))
    assert np.bincount(val.labels).tolist() == [40] * 10
    for other in (test, train):
        assert not np.isin(val.points[:, 0], other.points[:, 0]).any()
    np.testing.assert_array_equal(
        val.points, small_source(n_validation=40).load("validation").points
    )
    with pytest.raises(ValueError, match="validation_seed=0 is the source's own seed"):
        small_source(validation_seed=0)
    assert not np.array_equal(small_source(validation_seed=5).load("validation").points, val.points)

    dm = LongTailDataModule(source, image_size=None, num_classes=10, channels=2, hflip=False)
    dm.setup()
    points, labels = reference_points(dm, {"reference_split": "validation"})
    assert (
        torch.equal(points, torch.from_numpy(val.points)) and labels.tolist() == val.labels.tolist()
    )
    load = source.load
    source.load = lambda split: load("test" if split == "validation" else split)  # a broken split
    with pytest.raises(ValueError, match="shares 400 points with the test draws"):
        reference_points(dm, {"reference_split": "validation"})


def test_a_table_refuses_a_key_the_rows_method_does_not_have(tmp_path: Path) -> None:
    """A hyperparameter grid naming a setting the method does not take stops the table before
    anything is launched (Hydra refuses one without `+`; the key check one with it)."""
    from lt_diffusion.tables.launch import check_run_keys
    from lt_diffusion.tables.resolution import resolve
    from lt_diffusion.tables.spec import TableSpecError, load_table

    def spec(override: str):
        return load_table({
            "name": "grid", "seeds": [100], "eval": "toy_val",
            "columns": [{"key": "sw", "metric": "per_split.few.sw"}],
            "blocks": [{"label": "IR=100", "rows": [
                {"label": "x", "experiment": "toy/toy2d_ddpm", "overrides": [override]}]}],
        })  # fmt: skip

    with pytest.raises(TableSpecError, match="method.objective.tau"):
        resolve(spec("method.objective.tau=1"))
    grid = spec("+method.objective.tau=1")
    with pytest.raises(TableSpecError, match="tau is not an argument of"):
        check_run_keys(grid, resolve(grid))
    ok = spec("method.objective.cond_drop_prob=0.2")
    check_run_keys(ok, resolve(ok))


def test_training_refuses_a_variant_whose_class_would_miss_every_sub_mode(tmp_path: Path) -> None:
    """Through the train command: refused before the first step, no checkpoint written."""
    from lt_diffusion import train

    cfg = compose_config(
        "train",
        ["experiment=toy/toy2d_ddpm", "dataset=toy2d_shared", f"paths.output_dir={tmp_path}",
         "dataset.source.hidden=[0,0,0,0,0,0,2,2,2,4]", "train.max_steps=5"],
    )  # fmt: skip
    run_dir = tmp_path / "runs" / str(cfg.run_name)
    cfg.paths.run_dir = str(run_dir)
    with pytest.raises(ValueError, match="class 9 4 hidden sub-modes of 4: its training draw"):
        train.run(cfg)
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "config.yaml").exists()


def test_a_setting_the_layout_does_not_have_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"dataset.source.spread is not a setting of the ring"):
        small_source(spread=0.1)  # the constellation's setting, on the ring layout
    assert small_source(layout="constellation", spread=0.1).mixture.modes_per_class == 4
