"""Long-tailed classification (lt_diffusion.classify; CM paper Tables G.8 and G.13): the losses
against float64 recomputations of the LDAM and logit-adjustment papers' formulas, per-split
accuracy and macro precision / recall on a hand-made confusion, the ResNet-18 against
torchvision's, CM's low-rank split on the convolutions, the recipe's schedule, the checks
before any work, the augmentation path end to end on tiny data in the real on-disk format, and
both tables resolving to classification runs and records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from lt_diffusion.classification.config import check_config, classification_identity
from lt_diffusion.classification.losses import (
    CrossEntropyLoss,
    LDAMLoss,
    LogitAdjustedLoss,
)
from lt_diffusion.classification.metrics import classification_metrics
from lt_diffusion.classification.module import ClassifierModule, EpochSchedule
from lt_diffusion.classification.resnet import CifarResNet
from lt_diffusion.records.base import read_record
from tests.conftest import ROOT, compose_config

COUNTS = [500, 150, 40, 5]


def _cross_entropy64(z: list[float], y: int) -> float:
    """-log softmax(z)_y in plain float64 arithmetic."""
    top = max(z)
    return -(z[y] - top - math.log(sum(math.exp(v - top) for v in z)))


def _batch(seed: int = 0, n: int = 16, cosines: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, len(COUNTS), generator=g, dtype=torch.float64) * 2 - 1
    if not cosines:
        z = z * 4
    return z, torch.randint(0, len(COUNTS), (n,), generator=g)


def test_ldam_with_drw_is_cao_et_al_in_float64() -> None:
    """LDAM (Cao et al. 2019, eq. 13): margins m_c = C / n_c^(1/4) with the largest 0.5, on the
    target cosine, scaled by s; DRW from its epoch with Cui et al.'s (1 - b) / (1 - b^n_c)
    weights (normalised to sum to the class count) as a weighted mean."""
    loss = LDAMLoss(max_margin=0.5, scale=30.0, drw_epoch=3, drw_beta=0.9999)
    loss.setup(COUNTS)
    z, y = _batch(cosines=True)
    raw = [n**-0.25 for n in COUNTS]
    margins = [0.5 * r / max(raw) for r in raw]
    beta = 0.9999
    w = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [v * len(COUNTS) / sum(w) for v in w]
    per = []
    for row, label in zip(z.tolist(), y.tolist()):
        shifted = [30.0 * (v - (margins[c] if c == label else 0.0)) for c, v in enumerate(row)]
        per.append(_cross_entropy64(shifted, label))
    plain = sum(per) / len(per)
    weighted = sum(w[c] * v for c, v in zip(y.tolist(), per)) / sum(w[c] for c in y.tolist())
    assert float(loss(z, y, epoch=2)) == pytest.approx(plain, rel=1e-12)
    assert float(loss(z, y, epoch=3)) == pytest.approx(weighted, rel=1e-12)
    assert weighted != pytest.approx(plain, rel=1e-3)  # DRW changes something here
    # In float32 (training) the same numbers to float32 precision.
    assert float(loss(z.float(), y, epoch=3)) == pytest.approx(weighted, rel=1e-5)


def test_logit_adjustment_loss_and_post_hoc_are_menon_et_al_eqs_10_and_9() -> None:
    """Loss form: -log softmax(z + tau log pi)_y; post hoc: argmax_y z_y - tau log pi_y, with
    pi_c = n_c / sum n (Menon et al. 2021)."""
    tau = 1.5
    z, y = _batch(seed=1)
    log_pi = [math.log(n / sum(COUNTS)) for n in COUNTS]
    expected = sum(
        _cross_entropy64([v + tau * lp for v, lp in zip(row, log_pi)], label)
        for row, label in zip(z.tolist(), y.tolist())
    ) / len(y)
    la = LogitAdjustedLoss(tau=tau)
    la.setup(COUNTS)
    assert float(la(z, y)) == pytest.approx(expected, rel=1e-12)
    assert la.prediction_logits(z) is z  # the loss form predicts with the plain logits

    ce = CrossEntropyLoss(posthoc_tau=tau)
    ce.setup(COUNTS)
    expected_ce = sum(_cross_entropy64(r, t) for r, t in zip(z.tolist(), y.tolist())) / len(y)
    assert float(ce(z, y)) == pytest.approx(expected_ce, rel=1e-12)
    adjusted = ce.prediction_logits(z)
    for row, out in zip(z.tolist(), adjusted.tolist()):
        assert out == pytest.approx([v - tau * lp for v, lp in zip(row, log_pi)], rel=1e-12)
    # A head-class logit slightly above a tail-class one: post hoc, the tail class wins.
    tie = torch.tensor([[1.0, 0.0, 0.0, 0.9]], dtype=torch.float64)
    assert int(tie.argmax()) == 0 and int(ce.prediction_logits(tie).argmax()) == 3


def test_losses_refuse_what_they_cannot_use() -> None:
    with pytest.raises(ValueError, match="lower the imbalance ratio"):
        LDAMLoss().setup([10, 0, 3])
    with pytest.raises(ValueError, match="loss.scale"):
        LDAMLoss(scale=0.0)
    with pytest.raises(ValueError, match="loss.tau"):
        LogitAdjustedLoss(tau=-1.0)
    with pytest.raises(RuntimeError, match="setup"):
        CrossEntropyLoss()(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_per_split_accuracy_and_macro_scores_on_a_hand_made_confusion() -> None:
    """Four classes (two Many, one Medium, one Few), four test images each, predictions
    chosen by hand; every number below is counted on paper."""
    splits = ["many", "many", "medium", "few"]
    predicted = {0: [0, 0, 0, 1], 1: [1, 1, 0, 0], 2: [2, 2, 2, 0], 3: [3, 0, 0, 0]}
    targets = torch.tensor([c for c in predicted for _ in range(4)])
    predictions = torch.tensor([p for c in predicted for p in predicted[c]])
    m = classification_metrics(predictions, targets, splits)
    # correct: 3, 2, 3, 1 of 4; predicted as class c: 9, 3, 3, 1 times
    recall = [75.0, 50.0, 75.0, 25.0]
    precision = [100 / 3, 200 / 3, 100.0, 100.0]
    assert m["overall"]["n_test"] == 16
    assert m["overall"]["accuracy"] == pytest.approx(100 * 9 / 16)
    assert m["overall"]["macro_recall"] == pytest.approx(np.mean(recall))
    assert m["overall"]["macro_precision"] == pytest.approx(np.mean(precision))
    many, medium, few = (m["per_split"][s] for s in ("many", "medium", "few"))
    assert (many["n_test"], medium["n_test"], few["n_test"]) == (8, 4, 4)
    assert many["accuracy"] == pytest.approx(62.5) and many["macro_recall"] == pytest.approx(62.5)
    assert many["macro_precision"] == pytest.approx(50.0)
    assert medium["accuracy"] == pytest.approx(75.0)
    assert few["accuracy"] == pytest.approx(25.0) and few["macro_precision"] == pytest.approx(100)
    assert m["per_class"]["class_001"]["macro_precision"] == pytest.approx(200 / 3)

    # A class never predicted has precision 0, and the entry says so.
    never = classification_metrics(
        torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 1, 2]), splits[1:]
    )
    assert never["per_class"]["class_002"]["macro_precision"] == 0.0
    assert "never predicted" in never["overall"]["notes"][0]
    with pytest.raises(ValueError, match="0..3"):
        classification_metrics(torch.tensor([4]), torch.tensor([0]), splits)


def test_resnet18_is_torchvisions_with_the_cifar_stem() -> None:
    """Our ResNet-18 at width 64 is torchvision's resnet18 with a 3x3 stride-1 stem and no
    max-pool (the long-tail papers' CIFAR adaptation): same names, shapes and outputs."""
    ours = CifarResNet(num_classes=100, in_channels=3).eval()
    theirs = torchvision.models.resnet18(num_classes=100)
    theirs.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    theirs.maxpool = nn.Identity()
    theirs.load_state_dict(ours.state_dict())  # strict: the same parameters under the same names
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x))
    assert sum(p.numel() for p in ours.parameters()) == 11_220_132


def _classify_cfg(*overrides: str, tmp: Path | None = None):
    base = ["dataset=cifar100_lt", "imbalance=ir100", "classifier.model.width=8"]
    if tmp is not None:
        base += [f"paths.output_dir={tmp}", f"paths.run_dir={tmp / 'run'}"]
    return compose_config("classify", [*base, *overrides])


def test_cm_splits_the_convolutions_and_its_loss_is_eqs_2_to_4_on_the_logits() -> None:
    """capacity=cm decomposes every convolution (stem and stages; the head stays plain) with
    the diffusion method's low-rank layer, rank 0.1 min(d, k); L_CM is the weighted squared
    logit distance between the full model and theta_g (B A off), recomputed here by hand,
    and leaves BatchNorm's running statistics as they were."""
    from lt_diffusion.classification.run import build_classifier
    from lt_diffusion.methods.cm import cm_class_weights
    from lt_diffusion.models.lowrank import LowRankConv2d, set_expert_enabled

    model = build_classifier(_classify_cfg("capacity=cm"))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, LowRankConv2d) for _, m in convs), convs
    assert type(model.fc) is nn.Linear
    stem = model.conv1  # 3 -> 8 channels, 3x3: d = 8, k = 27
    assert stem.rank == max(1, int(0.1 * min(8, 27)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at a LoRA init: give the reserved part something to do
        for _, m in convs:
            m.lowrank_B.normal_(0.0, 0.1, generator=g)
    counts = [300, 30, 3] + [10] * 97
    loss = CrossEntropyLoss()
    loss.setup(counts)
    module = ClassifierModule(
        model, loss, lambda p: torch.optim.SGD(p, lr=0.1), EpochSchedule(1, 0, [], 1.0), counts,
        cm_lam=1.0,
    )  # fmt: skip
    x = torch.randn(6, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    logits = model(x)
    before = [b.clone() for n, b in model.named_buffers() if "running" in n]
    got = module.cm_loss(x, y, logits)
    after = [b for n, b in model.named_buffers() if "running" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    set_expert_enabled(model, False)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 0.0
    logits_g = model(x)
    set_expert_enabled(model, True)
    w_con, w_div = cm_class_weights(counts)
    d = (logits.double() - logits_g.double()).pow(2).mean(1)
    expected = ((w_con[y] - w_div[y]) * d).mean()
    assert float(d.min()) > 0  # the two branches differ
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_the_schedule_is_the_cifar_lt_recipe() -> None:
    """Cao et al.'s lr: (e + 1) / 5 over 5 warm-up epochs, x0.01 at 160 and again at 180."""
    s = EpochSchedule(steps_per_epoch=10, warmup_epochs=5, milestones=[160, 180], gamma=0.01)
    got = [s(step) for step in (0, 9, 10, 49, 50, 1599, 1600, 1799, 1800, 1999)]
    assert got == pytest.approx([0.2, 0.2, 0.4, 1.0, 1.0, 1.0, 1e-2, 1e-2, 1e-4, 1e-4])
    cfg = compose_config("classify", [])
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        0.1, 0.9, 2e-4,
    )  # fmt: skip
    assert (cfg.train.epochs, cfg.train.warmup_epochs, list(cfg.train.milestones)) == (
        200, 5, [160, 180],
    )  # fmt: skip
    assert cfg.data.batch_size == 128


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+train.epoch=3"], "train.epoch"),
        (["train.warmup_epochs=300"], "train.warmup_epochs"),
        (["train.epochs=12"], "train.milestones"),
        (["loss=ldam_drw", "train.epochs=12", "train.milestones=[8]"], "loss.fn.drw_epoch=160"),
        (["augment=generated", "augment.name=x"], "augment.generator.experiment"),
        (
            ["augment=generated", "augment.name=x", "augment.generator.experiment=classify/fashion_mnist_demo"],
            "is a classification row",
        ),
        (["augment=generated", "augment.name=x", "augment.checkpoint=/nowhere/last.ckpt"], "does not exist"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_config(_classify_cfg(*overrides))


def test_the_generator_run_trains_where_the_classifier_does() -> None:
    """An augmented row's generator run takes the classifier's trainer (a table's
    ``trainer=gpu`` reaches both: G.8's generators stay Table 2's runs), unless
    ``augment.generator.overrides`` choose one."""
    from lt_diffusion.classification.config import generator_config

    row = "experiment=classify/cm/cifar100_lt_ir100_ce_aug_cm50k"
    gen = generator_config(compose_config("classify", [row, "trainer=gpu"]))
    table2 = compose_config("train", ["experiment=cm/cifar100_lt_ir100_cm", "trainer=gpu"])
    assert gen.trainer == table2.trainer and gen.trainer.precision == "bf16-mixed"
    assert gen.run_name == table2.run_name
    own = compose_config(
        "classify", [row, "trainer=gpu", 'augment.generator.overrides=["trainer=cpu"]']
    )
    assert generator_config(own).trainer.accelerator == "cpu"


def test_augmentation_end_to_end_on_tiny_fashion_mnist(tmp_path: Path, monkeypatch) -> None:
    """A tiny diffusion checkpoint trained on Imb. Fashion-MNIST idx files fills every class
    up to the head; the images are generated once and cached by checkpoint, sampler, guidance
    and seed; the classifier trains on real + generated images; its record names the
    generator and validates."""
    from lt_diffusion.classification.run import run
    from lt_diffusion.runs import load
    from lt_diffusion.training import run as train
    from tests.fakedata import write_fashion_mnist

    data = tmp_path / "data"
    write_fashion_mnist(data / "fashion-mnist", n_per_class=20, test_per_class=2)
    common = [
        "dataset=fashion_mnist_lt", "imbalance=ir10", "trainer=cpu", "logger=none",
        f"paths.data_root={data}", f"paths.output_dir={tmp_path / 'out'}",
        "dataset.source.download=false", "data.batch_size=8",
    ]  # fmt: skip
    gen_cfg = compose_config(
        "train",
        [*common, "model=unet_tiny", "train.max_steps=1", "train.warmup_steps=1",
         "train.ckpt_every=1", "train.grid_every=0", "train.grid_per_class=1",
         "train.grid_steps=2", f"paths.run_dir={tmp_path / 'gen'}"],
    )  # fmt: skip
    train.run(gen_cfg)
    ckpt = tmp_path / "gen" / "checkpoints" / "last.ckpt"

    def classify(run_dir: str, *extra: str) -> dict:
        cfg = compose_config(
            "classify",
            [*common, "augment=generated", "augment.name=tiny", "augment.rule=fill_to_head",
             f"augment.checkpoint={ckpt}", "augment.sampler.sampler.steps=1",
             "augment.device=cpu", "classifier.model.width=4", "train.max_steps=2",
             "train.log_every=1", f"paths.run_dir={tmp_path / run_dir}", *extra],
        )  # fmt: skip
        return run(cfg)

    record = classify("a")
    real = record["dataset"]["class_counts"]
    assert real[0] == 20 and real[-1] == 2  # IR 10 of 20 images per class
    assert record["training"]["class_counts"] == [20] * 10  # the tail filled to the head
    assert record["training"]["n_generated"] == sum(20 - n for n in real)
    aug = record["training"]["augmentation"]
    assert aug["checkpoint"] == str(ckpt.resolve()) and aug["step"] == 1
    assert aug["per_class"] == [20 - n for n in real] and aug["sampler"]["name"] == "ddim1"
    folder = Path(aug["folder"])
    assert folder.parent == tmp_path / "gen" / "augment"
    assert len(list(folder.glob("class_*/*.png"))) == record["training"]["n_generated"]
    path = next((tmp_path / "a" / "records").glob("classify-test-*.json"))
    assert read_record(path)["metrics"]["overall"]["n_test"] == 20
    from lt_diffusion.classification.record import ClassificationRecord

    short = {**record, "training": {**record["training"], "class_counts": [20] * 9}}
    with pytest.raises(ValueError, match="training.class_counts has 9 classes, the dataset 10"):
        ClassificationRecord.model_validate(short)
    assert record["checkpoint"]["step"] == record["checkpoint"]["max_steps"] == 2

    # The same request again (another classifier run): read from the cache, nothing sampled.
    def no_sampling(*_, **__):
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(load, "sample_labels", no_sampling)
    again = classify("b", "seed=1", "augment.seed=0")
    assert again["training"]["augmentation"]["folder"] == str(folder)
    # Another seed for the images: a new folder (so it would sample).
    with pytest.raises(AssertionError, match="generated again"):
        classify("c", "augment.seed=5")

    # The record as a table cell: placed where cm_table_g13 expects its IR 100 CE run's record
    # (under that run's digest), the table reads its numbers and names no sampler.
    from lt_diffusion.records.base import write_record
    from lt_diffusion.tables.aggregate import collect
    from lt_diffusion.tables.render import to_markdown
    from lt_diffusion.tables.resolution import resolve
    from lt_diffusion.tables.spec import load_table_by_name

    spec = load_table_by_name("cm_table_g13")
    spec.seeds = [0]
    resolved = resolve(spec, [f"paths.output_dir={tmp_path / 'tables'}"])
    ce = next(r for r in resolved if r.run.experiment == "classify/cm/cifar100_lt_ir100_ce")
    write_record(
        next(iter(ce.records.values())),
        {**record, "identity": classification_identity(ce.config)},
    )
    result = collect(spec, resolved)
    assert result.samplers == () and result.guidance == ()
    cell = next(
        c for b in result.blocks for row, c in b[1] if row.label == "CE" and "100" in b[0].label
    )
    assert cell["few"].mean == pytest.approx(record["metrics"]["per_split"]["few"]["accuracy"])
    assert "Each dataset's test split" in to_markdown(result)


def test_cm_tables_resolve_to_classification_runs_and_records(tmp_path: Path) -> None:
    """Both tables' rows are classification runs; each record path carries the run's settings
    digest; G.8's no-augmentation row is G.13's IR 100 CE run (trained once for both); the
    table command plans them as classify jobs."""
    from lt_diffusion.tables.launch import plan
    from lt_diffusion.tables.resolution import resolve
    from lt_diffusion.tables.spec import load_table_by_name

    out = [f"paths.output_dir={tmp_path}"]
    g8, resolved, jobs = plan(compose_config("sweep", ["table=cm_table_g8", *out]))
    assert g8.task == "classify" and {j.task for j in jobs} == {"classify"} and len(jobs) == 9
    g13 = load_table_by_name("cm_table_g13")
    g13.seeds = [0]
    assert g13.task == "classify"
    resolved += resolve(g13, out)
    run_dirs: dict[str, set[Path]] = {}
    for r in resolved:
        assert r.run.task == "classify" and r.config.task == "classify"
        identity = classification_identity(r.config)
        path = r.run_dir / "records" / f"classify-test-{identity['digest']}.json"
        assert set(r.records.values()) == {path}
        assert ("generator" in identity) == ("aug" in r.run.experiment)
        run_dirs.setdefault(r.run.key, set()).add(r.run_dir)
    assert len(run_dirs["classify/cm/cifar100_lt_ir100_ce/seed0"]) == 1  # one run, both tables
    assert len(run_dirs) == 9 + 10 - 1


def test_g13_overall_is_the_split_weighted_mean_under_the_count_rule() -> None:
    """The split rule of the G.13 rows (Many > 100, Few < 20 training images) gives splits
    (30 / 31 / 39 classes at IR 200, 35 / 35 / 30 at IR 100) whose size-weighted mean of the
    published Many / Med. / Few is the published overall within the rounding of the printed
    numbers (0.01), at IR 200 and 100: the paper's splits. One row is 0.011 off (IR 100, LA + CM:
    45.129 for a printed 45.14), the paper's own slip."""
    from lt_diffusion.data import longtail_counts
    from lt_diffusion.data.splits import split_map
    from lt_diffusion.tables.spec import load_table_by_name

    spec = load_table_by_name("cm_table_g13")
    expected_sizes = {200: [30, 31, 39], 100: [35, 35, 30]}
    for block, ratio in zip(spec.blocks, (200, 100)):
        cfg = compose_config("classify", [f"experiment={block.rows[0].experiments['many']}"])
        assert cfg.imbalance.ratio == ratio and cfg.dataset.split_rule == "counts"
        splits = split_map(longtail_counts("exp", 500, 100, ratio), "counts")
        sizes = [splits.count(s) for s in ("many", "medium", "few")]
        assert sizes == expected_sizes[ratio]
        for row in block.rows:
            many, med, few, overall = (row.published[c.key] for c in spec.columns)
            mean = (sizes[0] * many + sizes[1] * med + sizes[2] * few) / 100
            slip = (ratio, row.label) == (100, "LA + CM")
            assert abs(mean - overall) <= (0.012 if slip else 0.01), (block.label, row.label)


def test_the_documented_record_schema_is_the_models() -> None:
    """docs/classification_record.schema.json is what the model says (regenerate with
    ``python -m lt_diffusion.classification.record > docs/classification_record.schema.json``)."""
    from lt_diffusion.classification.record import json_schema

    documented = json.loads((ROOT / "docs" / "classification_record.schema.json").read_text())
    assert documented == json_schema()


@pytest.mark.slow  # two table commands in subprocesses: ~30 s on two shared cores
def test_a_classification_table_runs_through_the_table_command(tmp_path: Path) -> None:
    """``python -m lt_diffusion.table`` on a one-row classification table: its job runs
    lt_diffusion.classify (not train then evaluate), writes the record the table reads, and
    the same command again launches nothing."""
    import subprocess
    import sys

    from tests.fakedata import write_fashion_mnist

    data, out, configs = tmp_path / "data", tmp_path / "out", tmp_path / "configs"
    write_fashion_mnist(data / "fashion-mnist", n_per_class=20, test_per_class=2)
    spec = {
        "name": "tiny_classify",
        "title": "Tiny classification table (tests)",
        "seeds": [0],
        "columns": [{"key": "few", "label": "Few", "metric": "per_split.few.accuracy"}],
        "blocks": [{"rows": [{"label": "CE", "experiment": "classify/fashion_mnist_demo"}]}],
    }
    (configs / "table").mkdir(parents=True)
    (configs / "table" / "tiny_classify.yaml").write_text(json.dumps(spec))  # JSON is YAML
    train = [
        "imbalance=ir10", "trainer=cpu", "logger=none", "dataset.source.download=false",
        "classifier.model.width=4", "data.batch_size=8", "train.max_steps=2",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "lt_diffusion.table", "table=tiny_classify",
        f"hydra.searchpath=[file://{configs}]", f"paths.output_dir={out}",
        f"paths.data_root={data}", f"train_overrides=[{','.join(json.dumps(o) for o in train)}]",
    ]  # fmt: skip

    def table() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    first = table()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (path,) = out.glob("runs/*/records/classify-test-*.json")
    few = read_record(path)["metrics"]["per_split"]["few"]["accuracy"]
    md = (out / "tables" / "tiny_classify.md").read_text()
    assert f"{few:.2f}" in md and "Each dataset's test split" in md
    again = table()
    assert again.returncode == 0 and "1 done, 0 to run" in again.stdout, again.stdout[-2000:]


def test_random_crop_is_a_window_of_the_padded_image() -> None:
    """Each cropped image is the H x W window of its image padded by p pixels of -1 at some
    offset in [0, 2p] (torchvision's RandomCrop(padding=p)), and the offsets vary."""
    from torch.nn.functional import pad

    from lt_diffusion.classification.data import random_crop

    x = torch.rand(16, 2, 6, 5) * 2 - 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = pad(x, (2, 2, 2, 2), value=-1.0)
    offsets = set()
    for i in range(len(x)):
        found = [
            (a, b)
            for a in range(5)
            for b in range(5)
            if torch.equal(out[i], padded[i, :, a : a + 6, b : b + 5])
        ]
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 3
    assert random_crop(x, 0, torch.Generator()) is x


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """Two steps, stop, resume to four: the same weights as four steps straight (the batch
    stream, the crops and the learning-rate schedule are functions of the step); the temporary
    files of killed writes are swept at the resume."""
    from lt_diffusion.classification.run import run
    from lt_diffusion.runs.checkpoint import read_checkpoint
    from tests.fakedata import write_fashion_mnist

    data = tmp_path / "data"
    write_fashion_mnist(data / "fashion-mnist", n_per_class=20, test_per_class=2)

    def train(run_dir: str, steps: int) -> dict[str, torch.Tensor]:
        cfg = compose_config(
            "classify",
            ["dataset=fashion_mnist_lt", "imbalance=ir10", "trainer=cpu", "logger=none",
             f"paths.data_root={data}", f"paths.output_dir={tmp_path}",
             f"paths.run_dir={tmp_path / run_dir}", "dataset.source.download=false",
             "data.batch_size=8", "classifier.model.width=4", "train.warmup_epochs=1",
             f"train.max_steps={steps}", "train.ckpt_every=100"],
        )  # fmt: skip
        run(cfg)
        return read_checkpoint(tmp_path / run_dir / "checkpoints" / "last.ckpt")["state_dict"]

    straight = train("straight", 4)
    train("resumed", 2)
    # What a kill of the first attempt would have left: swept by the resumed one, as for training.
    names = (".config.yaml.t5y6u7i8.tmp", "checkpoints/.last.ckpt.k2j4_x9q.tmp")
    leftovers = [tmp_path / "resumed" / n for n in names]
    for leftover in leftovers:
        leftover.write_bytes(b"\0" * 100)
    resumed = train("resumed", 4)
    assert not any(p.exists() for p in leftovers)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_a_generation_protocol_naming_a_classification_metric_is_refused() -> None:
    """The registry knows accuracy / macro precision / recall (so table columns and records
    name them), but a generation evaluation cannot compute them: refused at its checks."""
    from lt_diffusion.evaluation.metrics import METRICS, minimum_images

    assert {"accuracy", "macro_precision", "macro_recall"} <= set(METRICS)
    with pytest.raises(ValueError, match="remove it from eval.metrics"):
        minimum_images(["fid", "accuracy"], {})
