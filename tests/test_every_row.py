"""Every row runs: each experiment file, and each row of each table spec, is composed, every
object it names is instantiated (datamodule, backbone, method transform, objective, schedule,
the protocol's sampler, the evaluator), one training step is taken through the real training
path, images are generated with the row's protocol sampler and guidance, and the row's table
columns are computed into a record.

Classification rows (``configs/experiment/classify/``) go through ``lt_diffusion.classify``
instead: one training step of the ResNet-18 at width 4 (after the generator row's smoke when the
row augments its data with generated images), then the test evaluation into the record whose
numbers the row's table columns read.

Everything runs on tiny data that :mod:`tests.fakedata` writes in each dataset's published
on-disk format (CIFAR pickles, idx files, CelebA-HQ / ImageNet-LT / iNaturalist / ArtBench-10
image folders and lists, CUB-200 / Oxford-102 with their captions) and with the backbone at
reduced width; Stable Diffusion rows use a tiny randomly initialised Stable Diffusion folder
written with diffusers. What is reduced, for speed only: the U-Net width and depth,
ImageNet-LT / iNaturalist / CUB-200 / Oxford-102 to 3 classes, the text-conditioned rows to
ldm_text_tiny's random autoencoder, CLIP text encoder and U-Net at 32 px, ArtBench-10 to 32 px
for Stable Diffusion, the protocol's image counts and sampler steps, the trainer (CPU), the
concept-dominance analysis to the pairs of three styles, one image each, two steps, the IMBA
rows' concept images to 100 / 1 per concept, their prompt-composition analysis to one image per
prompt and their synthetic composition analysis to two samples per pair, at two steps each.
Inception runs for one row per dataset; the other rows use a small fixed random-projection
extractor (the metric code after the features is the same; the Inception network has its own
tests in test_inception.py / test_evaluation_metrics.py). LPIPS runs on a random AlexNet trunk
unless its weights are staged (test_diversity.py tests LPIPS).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from lt_diffusion.classification.config import experiment_task
from lt_diffusion.evaluation.diversity import LPIPSWeightsError, alexnet_weights
from lt_diffusion.tables import load_table_by_name
from lt_diffusion.tables.aggregate import metric_entry
from lt_diffusion.tables.spec import EvalRef, available_tables
from tests.conftest import CONFIG_DIR, compose_config
from tests.stand_ins import stand_in_space

EXPERIMENTS = sorted(
    str(p.relative_to(Path(CONFIG_DIR) / "experiment").with_suffix(""))
    for p in (Path(CONFIG_DIR) / "experiment").rglob("*.yaml")
)


def _row_key(ev: EvalRef) -> str:
    """``experiment``, or ``experiment@dataset`` for a row that runs it on another dataset
    (``dataset=`` among its overrides: the synthetic benchmark's variants)."""
    dataset = next((o[8:] for o in ev.run.overrides if o.startswith("dataset=")), None)
    return ev.run.experiment if dataset is None else f"{ev.run.experiment}@{dataset}"


def _table_evaluations() -> dict[str, list[tuple[EvalRef, list[str]]]]:
    """row key (:func:`_row_key`) -> its evaluations in any table, each with the metric paths
    it must give."""
    out: dict[str, dict[EvalRef, set[str]]] = defaultdict(dict)
    for name in available_tables():
        spec = load_table_by_name(name)
        spec.seeds = [0]
        for block in spec.blocks:
            for row in block.rows:
                for column in spec.columns:
                    for ev in spec.cell_evals(row, column):
                        out[_row_key(ev)].setdefault(ev, set()).add(column.metric)
    return {e: [(ev, sorted(m)) for ev, m in evs.items()] for e, evs in out.items()}


TABLE_EVALS = _table_evaluations()
# Rows on another dataset than their experiment's: by default each such dataset runs with the
# experiment that has the most evaluations on it (the floors' rows), every one under -m slow.
_VARIANTS = sorted(k for k in TABLE_EVALS if "@" in k)
_SMOKED = {
    max((v for v in _VARIANTS if v.split("@")[1] == d), key=lambda v: len(TABLE_EVALS[v]))
    for d in {k.split("@")[1] for k in _VARIANTS}
}
# Stable Diffusion rows of the IMBA tables that differ from imba/sd_imba only in loss settings
# tested on their own (tests/test_imba_composition.py); tests/test_imba_tables.py runs all of
# them end to end in its (slow) table commands. Seconds each on the tiny Stable Diffusion.
SLOW_ROWS = {"imba/sd_budget", "imba/sd_plain", "imba/sd_imba_sample", "imba/sd_freq"}
ROWS = [pytest.param(e, marks=pytest.mark.slow) if e in SLOW_ROWS else e for e in EXPERIMENTS] + [
    pytest.param(k, marks=() if k in _SMOKED else pytest.mark.slow) for k in _VARIANTS
]
# This row evaluates with the real Inception (tests/test_stable_diffusion.py evaluates the SD
# path with it too); the others with a stand-in (see above).
INCEPTION_ROWS = {"cm/cifar10_lt_ir50_focal"}
# Besides the Inception Score (no logits offline), the numbers a smoke may leave unavailable:
# CLIP scores and VQA judgements when no such model is staged, and the shift of composing
# samples of the synthetic composition data when one training step composes none.
UNAVAILABLE_OK = ("no CLIP model is staged", "no VQA model is staged", "composes its pair")
# Smaller versions of the paper datasets (what the tiny files hold).
SMALL_NATIVE = {"imagenet": [120, 40, 8], "inaturalist": [120, 40, 8]}  # Many / Medium / Few


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One data root holding every dataset in its published format, a tiny Stable Diffusion,
    and the outputs / cache every row of this module shares."""
    from tests import fakedata

    tmp = tmp_path_factory.mktemp("rows")
    data = tmp / "data"
    fakedata.write_cifar10(data / "cifar10", n_per_class=100, test_per_class=2)
    # 200 per class: IR 200 (CM Table G.13) leaves the tail class one image
    fakedata.write_cifar100(data / "cifar100", n_per_class=200, test_per_class=1)
    fakedata.write_fashion_mnist(data / "fashion-mnist", n_per_class=100, test_per_class=2)
    fakedata.write_celeba_hq(data / "celeba_hq", male=[0] * 100 + [1] * 100)
    fakedata.write_imagenet_lt(data / "imagenet", SMALL_NATIVE["imagenet"], test_per_class=3)
    fakedata.write_inaturalist(
        data / "inaturalist", [31, 7, 12], SMALL_NATIVE["inaturalist"], val_per_class=3
    )
    fakedata.write_artbench10(data / "artbench10", n_per_class=100, test_per_class=2)
    # 30 training images per class, as CUB's split: IR 10 (Table G.11) leaves the tail three.
    fakedata.write_cub200(data / "cub200", n_per_class=30, test_per_class=1, num_classes=3)
    fakedata.write_oxford102(data / "oxford102", train_per_class=30, test_counts=1, num_classes=3)
    # The IMBA rows' two concepts: 100 and 1 images keep step_ir100's counts at 100 per concept.
    fakedata.write_concept_images(data / "concept_images", {"piano": 100, "submarine": 1})
    # Prompts of two ArtBench-10 styles (concept_dominance) need ~40 tokens of the tiny tokenizer.
    sd = fakedata.write_tiny_sd(tmp / "tiny-sd", schedule="scaled_linear", max_length=48)
    return {"data": data, "out": tmp / "outputs", "cache": tmp / "cache", "sd": sd}


# What makes a diffusion row a seconds-long CPU smoke (besides the backbone's reduction).
SMOKE_TRAIN = [
    "trainer=cpu",
    "logger=none",
    "data.batch_size=8",
    "train.max_steps=1",
    "train.warmup_steps=1",
    "train.ckpt_every=1",
    "train.grid_every=0",  # one grid, at the end of the step
    "train.grid_per_class=1",
    "train.grid_steps=2",
    "train.log_every=1",
]


def _unet_reduction(image_size: int) -> dict[str, Any]:
    return {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [image_size // 2]}


def _paths(world: dict[str, Path]) -> list[str]:
    return [
        f"paths.data_root={world['data']}",
        f"paths.output_dir={world['out']}",
        f"paths.cache_dir={world['cache']}",
    ]


def _row_config(experiment: str, world: dict[str, Path], dataset: str = "") -> DictConfig:
    """The row as written (on ``dataset`` when given), plus what makes it a seconds-long CPU
    smoke (see the docstring)."""
    other = [f"dataset={dataset}"] if dataset else []
    cfg = compose_config(
        "train", [f"experiment={experiment}", *other, "seed=0", *_paths(world), *SMOKE_TRAIN]
    )
    with open_dict(cfg):
        if cfg.dataset.source.get("download") is not None:
            cfg.dataset.source.download = False
        if cfg.dataset.name.startswith(("imagenet_lt", "inaturalist", "cub200", "oxford102")):
            cfg.dataset.num_classes = 3
        target = str(cfg.model._target_)
        if cfg.dataset.name.startswith("concepts_"):  # concept_images: the tiny folders
            cfg.dataset.source.n_per_class = 100
        if target.endswith("StableDiffusionBackbone"):
            cfg.model.pretrained = str(world["sd"])
            cfg.model.lora.rank = cfg.model.lora.alpha = 4
            cfg.model.latent_cache_dir = None
            cfg.model.gradient_checkpointing = False
            cfg.dataset.image_size = 32
            transform = cfg.method.get("model_transform") or {}
            if "rank" in transform:  # below the general rank, as CM's 8 < 128
                cfg.method.model_transform.rank = 2
        elif target.endswith(".TextLatentUNet"):  # ldm_text_tiny: random VAE, CLIP, U-Net
            tiny = compose_config("train", ["model=ldm_text_tiny"]).model
            for key in ("vae", "text_encoder", "unet"):
                cfg.model[key] = tiny[key]
            cfg.model.latent_cache_dir = cfg.model.caption_cache_dir = None
            cfg.dataset.image_size = 32
        elif target.endswith(".UNet"):
            cfg.model.update(_unet_reduction(int(cfg.dataset.image_size)))
        elif target.endswith((".MLPDenoiser", ".ConceptPairMLP")):  # the synthetic data's
            # The transfer variant's tail must still show its training sub-modes.
            hidden = cfg.dataset.source.get("hidden")
            cfg.dataset.source.n_per_class = 1000 if hidden else 100
        else:  # a new kind of backbone: add its reduction here
            raise AssertionError(f"{experiment}: no reduced width for {target}")
    return cfg


def _train(experiment: str, world: dict[str, Path], dataset: str = "") -> Path:
    """One training step of the row through lt_diffusion.train; its checkpoint."""
    from lt_diffusion import train

    cfg = _row_config(experiment, world, dataset)
    init_from = cfg.train.get("init_from")
    if init_from and not Path(init_from).is_file():  # fine-tuning rows start from another row
        dependency = Path(init_from).parent.parent.name.replace("-seed0", "")
        dataset, imbalance, method = dependency.split("-")
        _train(f"cm/{dataset}_{imbalance}_{method}", world)
    run_dir = Path(cfg.paths.output_dir) / "runs" / str(cfg.run_name)
    cfg.paths.run_dir = str(run_dir)
    train.run(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), f"{experiment} wrote no checkpoint"
    return last


def _classify(experiment: str, world: dict[str, Path]) -> dict[str, Any]:
    """A classification row (configs/experiment/classify/) through lt_diffusion.classify: one
    step of a ResNet-18 at width 4, then the test evaluation into its record. An augmented row
    trains its generator row first (as the row's smoke: the same reduced U-Net and one step)
    and generates one image per class with one DDIM step."""
    from lt_diffusion.classification.run import run

    cfg = compose_config(
        "classify",
        [
            f"experiment={experiment}",
            "seed=0",
            *_paths(world),
            "trainer=cpu",
            "logger=none",
            "data.batch_size=8",
            "train.max_steps=1",
            "train.ckpt_every=1",
            "train.log_every=1",
            "classifier.model.width=4",
        ],
    )
    with open_dict(cfg):
        cfg.dataset.source.download = False
        if cfg.augment.rule != "none":
            generator = compose_config("train", [f"experiment={cfg.augment.generator.experiment}"])
            unet = _unet_reduction(int(generator.dataset.image_size))
            cfg.augment.generator.overrides = [
                *SMOKE_TRAIN,
                "dataset.source.download=false",
                *(f"model.{k}={v}".replace(" ", "") for k, v in unet.items()),
            ]
            cfg.augment.total = int(cfg.dataset.num_classes)
            cfg.augment.sampler.sampler.steps = 1
            cfg.augment.device = "cpu"
        cfg.paths.run_dir = str(Path(cfg.paths.output_dir) / "runs" / str(cfg.run_name))
    record = run(cfg)
    assert record is not None and record["kind"] == "classification"
    return record


class RandomProjection(nn.Module):
    """A stand-in for the Inception extractor: 8x8 average-pooled pixels through a fixed random
    projection to 32 features, under the layer name the evaluator reads (``"2048"``). Its
    32 dimensions keep FID's matrix square root cheap (2048-d costs seconds per comparison)."""

    features_list = ("2048",)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3 * 64, 32, generator=g) / 8.0)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)
        return (torch.tanh(x @ self.w),)


def _lpips_stand_in(device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """LPIPS with the package's linear layers on a random AlexNet trunk, for when torchvision's
    AlexNet weights are not staged (test_diversity.py checks LPIPS itself)."""
    import warnings

    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about `pretrained=False`
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    return model.eval().to(device), {"net": "alex", "trunk_weights": "random (smoke test)"}


def _analyze(checkpoint: Path, ev: EvalRef, world: dict[str, Path]) -> dict[str, Any]:
    """The row's analysis with the table's settings; concept_dominance on the six prompts of
    three styles, at one image per prompt, two sampler steps and one ablated prompt."""
    from lt_diffusion import analyze

    cfg = compose_config(
        "analyze",
        [*ev.eval_overrides(), f"checkpoint={checkpoint}", "device=cpu", "progress=false"],
    )
    if ev.analysis == "concept_dominance":
        prompts = world["out"] / "two_style_pairs.yaml"
        prompts.write_text(
            'template: "a {} painting and a {} painting"\n'
            "pairs: [[baroque, ukiyo_e], [ukiyo_e, realism], [realism, baroque], "
            "[ukiyo_e, baroque], [realism, ukiyo_e], [baroque, realism]]\n"
        )
        cfg.analysis.update(prompt_set=str(prompts), images_per_prompt=1, steps=2,
                            ablation_prompts=1, ablation_steps=1, group_sizes=[2])  # fmt: skip
    elif ev.analysis == "prompt_composition":
        cfg.analysis.update(images_per_prompt=1, steps=2)
    elif ev.analysis == "composition":
        cfg.analysis.update(samples_per_pair=2, steps=2)
    return analyze.run(cfg)


def _evaluate(checkpoint: Path, ev: EvalRef, world: dict[str, Path]) -> dict[str, Any]:
    """The row's evaluation with its protocol's comparisons, metrics, sampler and guidance,
    at one or two images per class and one sampler step."""
    from lt_diffusion import evaluate

    if ev.analysis is not None:
        return _analyze(checkpoint, ev, world)

    meta = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["lt_diffusion"]
    splits = meta["dataset"]["splits"]
    cfg = compose_config(
        "evaluate",
        [*ev.eval_overrides(), f"checkpoint={checkpoint}", f"paths.cache_dir={world['cache']}",
         "device=cpu"],
    )  # fmt: skip
    smaller = {
        "overall": max(2, len(splits)),
        "per_split": max(2, *(splits.count(s) for s in set(splits))),
        "per_class": 2,
    }
    for kind, generated in smaller.items():
        if cfg.eval[kind].get("generated"):
            cfg.eval[kind].generated = generated
            cfg.eval[kind].real_per_class = 2
    smallest = {
        "pr_k": 1,
        "kid_subset_size": 2,
        "kid_subsets": 2,
        "is_splits": 1,
        "batch_size": 128,
    }
    cfg.eval.update({k: v for k, v in smallest.items() if k in cfg.eval})  # the protocol's own
    if "steps" in cfg.eval.sampler:
        cfg.eval.sampler.steps = 1
    record = evaluate.run(cfg)
    assert record is not None
    return record


@pytest.mark.parametrize("row", ROWS)
def test_the_row_builds_trains_samples_and_evaluates(
    row: str, world: dict[str, Path], monkeypatch
) -> None:
    from lt_diffusion.evaluation import evaluator

    experiment, _, dataset = row.partition("@")
    if experiment_task(experiment) == "classify":
        record = _classify(experiment, world)
        for _, metrics in TABLE_EVALS.get(experiment, []):
            for metric in metrics:
                value, why = metric_entry(record, metric)
                assert value is not None and math.isfinite(value), (experiment, metric, why)
        return
    checkpoint = _train(experiment, world, dataset)
    if experiment not in INCEPTION_ROWS:
        stand_in_space(monkeypatch, RandomProjection(), dim=32, name="random-projection")
    try:
        alexnet_weights()
    except LPIPSWeightsError:
        monkeypatch.setattr(evaluator, "load_lpips", _lpips_stand_in)
    for ev, metrics in TABLE_EVALS.get(row, []):
        record = _evaluate(checkpoint, ev, world)
        assert record["checkpoint"]["theta_g_only"] == ev.theta_g_only
        for metric in metrics:
            value, why = metric_entry(record, metric)
            if value is None:  # only the Inception Score (no logits offline) and the
                # UNAVAILABLE_OK numbers may be unavailable
                assert (metric.endswith(".is") and "logits" in str(why)) or any(
                    reason in str(why) for reason in UNAVAILABLE_OK
                ), (experiment, metric, why)
            else:
                assert math.isfinite(value), (experiment, metric, value)


def test_rows_have_their_own_run_directories() -> None:
    """Two rows in one run directory would resume (and overwrite) each other's runs."""
    rows = [e for e in EXPERIMENTS if "budget" not in e]  # budget files are bases, not rows
    names: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        names[str(compose_config(experiment_task(row), [f"experiment={row}"]).run_name)].append(row)
    shared = {name: rows for name, rows in names.items() if len(rows) > 1}
    assert not shared, shared


def test_every_table_row_is_covered() -> None:
    """Every row of every table names experiments that this module runs (or says missing)."""
    for name in available_tables():
        spec = load_table_by_name(name)
        for block in spec.blocks:
            for row in block.rows:
                assert row.missing is not None or set(row.experiments.values()) <= set(
                    EXPERIMENTS
                ), (name, row.label)
    assert len(TABLE_EVALS) > 60 and np.mean([len(v) for v in TABLE_EVALS.values()]) >= 1
