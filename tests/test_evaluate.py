"""The evaluate command end to end on a tiny trained model: record contents, the same record
from two gloo processes as from one, and the early errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.evaluation.inception import ISUnavailableError, official_weights
from lt_diffusion.evaluation.metrics import TooFewImagesError
from lt_diffusion.runs.checkpoint import CheckpointError
from tests.conftest import ROOT, compose_config, tiny_eval

# Tiny protocol: ~60 Inception passes in all.
PROTOCOL = tiny_eval(
    {"eval.per_split.generated": 12, "eval.per_split.real_per_class": 3, "eval.batch_size": 8}
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from lt_diffusion import train
    from tests.fakedata import write_cifar10

    tmp = tmp_path_factory.mktemp("eval")
    write_cifar10(tmp / "data" / "cifar10", n_per_class=20)
    cfg = compose_config(
        "train",
        [
            "dataset=cifar10_lt", "imbalance=ir10", "model=unet_tiny", "logger=csv",
            f"paths.data_root={tmp / 'data'}", "dataset.source.download=false",
            "data.batch_size=8", "train.max_steps=3", "train.grid_every=0",
            f"paths.run_dir={tmp / 'run'}",
        ],
    )  # fmt: skip
    train.run(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt"


def _evaluate(checkpoint: Path | None, tmp_path: Path, *extra: str):
    from lt_diffusion import evaluate

    source = [f"checkpoint={checkpoint}"] if checkpoint is not None else []
    cfg = compose_config(
        "evaluate", [*source, f"paths.cache_dir={tmp_path / 'cache'}", *PROTOCOL, *extra]
    )
    return evaluate.run(cfg)


# The evaluate command, recording the images it generates (each rank's, with its share of the
# chunks) before it goes on: what "the same images" is checked against.
SPY = """
import os, sys, torch
from lt_diffusion import evaluate
from lt_diffusion.evaluation import evaluator

generate = evaluator.generate

def recorded(*args, rank, world_size, **kwargs):
    images = generate(*args, rank=rank, world_size=world_size, **kwargs)
    torch.save(images, os.path.join(os.environ["SPY_DIR"], f"rank{rank}-of-{world_size}.pt"))
    return images

evaluator.generate = recorded
evaluate.main()
"""
# Per class 3 or 4 generated images (the splits' counts) in chunks of 3, rank k % 2 taking
# chunk k: classes 0, 2, 3 and 5 have images on both ranks, in unequal parts.
BATCH = 3
PER_CLASS = tiny_eval(
    {"eval.per_split.generated": 12, "eval.per_split.real_per_class": 3,
     "eval.per_class.generated": 3, "eval.kid_subset_size": 3, "eval.batch_size": BATCH}
)  # fmt: skip


# Three evaluate processes, each loading Inception: 242 s on a busy 2-core machine (slow).
@pytest.mark.slow
def test_two_processes_make_the_record_of_one(checkpoint: Path, tmp_path: Path) -> None:
    """The evaluate command under torchrun (two gloo processes) and alone: the same generated
    images, bit for bit, and the same record, number for number, overall, per split and per
    class (classes whose images fall on both ranks in unequal parts)."""
    from lt_diffusion.diffusion import gather_order
    from lt_diffusion.diffusion.generate import chunk_ranges
    from lt_diffusion.evaluation.evaluator import class_labels

    (tmp_path / "spy.py").write_text(SPY)
    # One thread per process in both: CPU reductions (convolutions, BLAS) depend on it.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SPY_DIR=str(tmp_path))
    common = [f"checkpoint={checkpoint}", *PER_CLASS, "track=false"]
    launchers = {
        "one": [sys.executable, str(tmp_path / "spy.py")],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=29517", str(tmp_path / "spy.py")],
    }  # fmt: skip
    records = {}
    for name, launcher in launchers.items():
        cmd = [
            *launcher,
            *common,
            f"paths.cache_dir={tmp_path / name}",
            f"record={tmp_path / name}.json",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records[name] = json.loads((tmp_path / f"{name}.json").read_text())

    one = torch.load(tmp_path / "rank0-of-1.pt")
    parts = [torch.load(tmp_path / f"rank{r}-of-2.pt") for r in (0, 1)]
    assert torch.equal(gather_order(parts, len(one), BATCH), one)
    labels = class_labels(records["one"]["generated_per_class"])
    on_rank = [labels[torch.cat([torch.arange(a, b) for a, b in chunk_ranges(len(one), BATCH, r, 2)])]
               for r in (0, 1)]  # fmt: skip
    split = [(int((on_rank[0] == c).sum()), int((on_rank[1] == c).sum())) for c in range(10)]
    assert sum(a != b and a > 0 and b > 0 for a, b in split) >= 4, split

    for record in records.values():  # when and how long: the only fields that may differ
        del record["created"], record["seconds"]
    assert records["two"] == records["one"]
    m = records["one"]["metrics"]
    assert len(m["per_class"]) == 10 and set(m["per_split"]) == {"many", "medium", "few"}
    assert m["per_class"]["class_000"]["n_generated"] == 3 and m["per_class"]["class_000"]["fid"]
    assert (
        records["one"]["dataset"]["class_counts"][0] == 20
        and records["one"]["extractors"]["inception"]["weights_sha256"]
    )
    data = checkpoint.parents[2] / "data" / "cifar10" / "cifar-10-batches-py"
    assert records["one"]["dataset"]["root"] == str(data.resolve())  # the folder read
    assert (tmp_path / "one.png").is_file()


def test_data_root_is_the_folder_read_or_refused(checkpoint: Path, tmp_path: Path) -> None:
    """``data_root=<dir>``: a root without the dataset's folder is refused naming the path it
    expected, before any generation; a root with it is where the real images are read (the
    record's ``dataset.root``, checked above for the run's own root)."""
    import shutil

    from lt_diffusion.runs.checkpoint import read_checkpoint
    from lt_diffusion.runs.load import run_datamodule

    with pytest.raises(FileNotFoundError) as err:
        _evaluate(checkpoint, tmp_path, f"data_root={tmp_path}")
    assert f"expected in {tmp_path / 'cifar10'}" in str(err.value)
    shutil.copytree(checkpoint.parents[2] / "data" / "cifar10", tmp_path / "cifar10")
    train_cfg = OmegaConf.create(read_checkpoint(checkpoint)["lt_diffusion"]["config"])
    assert run_datamodule(train_cfg, tmp_path).source.location == (
        tmp_path / "cifar10" / "cifar-10-batches-py"
    )


def test_a_given_data_root_never_falls_back_to_the_system_copy(tmp_path: Path) -> None:
    # Fashion-MNIST is also installed system-wide (Debian's copy, the default run's fallback):
    # a data_root given explicitly must hold it, or the evaluation stops naming the folder.
    from lt_diffusion.data import sources
    from lt_diffusion.runs.load import run_datamodule
    from tests.fakedata import write_fashion_mnist

    system = tmp_path / "system"
    write_fashion_mnist(system, 20, 1, seed=0)
    train_cfg = compose_config(
        "train",
        ["dataset=fashion_mnist_lt", "imbalance=ir10", f"paths.data_root={tmp_path / 'trained'}",
         f"paths.run_dir={tmp_path / 'run'}", "dataset.source.download=false"],
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "DEBIAN_FASHION_MNIST", system)
        assert run_datamodule(train_cfg).source.location == system  # the run's own root: as trained
        given = tmp_path / "given"
        with pytest.raises(FileNotFoundError, match=f"expected in {given / 'fashion-mnist'}"):
            run_datamodule(train_cfg, given)
        (given / "fashion-mnist").mkdir(parents=True)  # the folder, without the files
        with pytest.raises(FileNotFoundError) as err:
            run_datamodule(train_cfg, given)
    assert str(given / "fashion-mnist") in str(err.value) and str(system) not in str(err.value)


def test_too_few_real_images_stops_before_generation(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(TooFewImagesError, match="real images"):
        _evaluate(checkpoint, tmp_path, "eval.pr_k=5", "eval.per_split.real_per_class=1")


@pytest.mark.skipif(
    official_weights() is not None, reason="torch-fidelity's own weights are staged"
)
def test_required_is_without_logits_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ISUnavailableError, match="logits"):
        _evaluate(checkpoint, tmp_path, "eval.metrics=[fid,is]", "eval.require_is=true")


def test_is_not_required_is_reported_unavailable(checkpoint: Path, tmp_path: Path) -> None:
    if official_weights() is not None:
        pytest.skip("torch-fidelity's own weights are staged: IS is a number")
    record = _evaluate(checkpoint, tmp_path, "eval.metrics=[fid,is]", "eval.per_split.generated=0")
    overall = record["metrics"]["overall"]
    assert overall["is"] is None and "logits" in overall["is_unavailable"]


def test_checkpoint_of_another_dataset_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not fashion_mnist_lt"):
        _evaluate(checkpoint, tmp_path, "dataset=fashion_mnist_lt")
    with pytest.raises(CheckpointError, match="64px"):
        _evaluate(checkpoint, tmp_path, "dataset=cifar10_lt", "dataset.image_size=64")


def test_the_protocols_sampler_runs_and_names_the_record(
    checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    from lt_diffusion.diffusion import samplers

    calls = []
    real_guided_eps = samplers.guided_eps

    def counting(model, x, t, y, guidance):
        calls.append(int(t[0]))
        return real_guided_eps(model, x, t, y, guidance)

    monkeypatch.setattr(samplers, "guided_eps", counting)
    record = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0")
    chunks = -(-10 // 8)  # 10 images in batches of 8
    assert len(calls) == 3 * chunks  # eval.sampler.steps=3, not the sampler group's 50
    node = record["sampler"]
    assert node["name"] == "ddim3" and node["group"] == "ddim"
    assert node["sampler"]["steps"] == 3 and node["sampler"]["clip_denoised"] is True  # auto
    name = f"quick-ddim3-w0-{record['identity']['digest']}.json"
    assert (checkpoint.parent.parent / "records" / name).is_file()


def test_records_under_other_settings_never_overwrite_each_other(
    checkpoint: Path, tmp_path: Path
) -> None:
    first = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0")
    other = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0", "eval.kid_subsets=2")
    assert first["identity"]["digest"] != other["identity"]["digest"]
    assert first["identity"]["train"] == other["identity"]["train"]
    names = {p.name for p in (checkpoint.parent.parent / "records").glob("quick-ddim3-*.json")}
    assert {f"quick-ddim3-w0-{r['identity']['digest']}.json" for r in (first, other)} <= names


def test_theta_g_only_needs_the_reserved_capacity(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no reserved low-rank capacity"):
        _evaluate(checkpoint, tmp_path, "theta_g_only=true")


def test_guidance_needs_a_trained_null_label(train_overrides, tmp_path: Path) -> None:
    from lt_diffusion import sample, train

    run_dir = tmp_path / "nodrop"
    cfg = compose_config(
        "train",
        train_overrides(
            "train.max_steps=2", "method.objective.cond_drop_prob=0", f"paths.run_dir={run_dir}"
        ),
    )
    train.run(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="without label dropout.*eval.guidance=0"):
        _evaluate(last, tmp_path, "eval.guidance=1.5")
    with pytest.raises(ValueError, match="without label dropout.*guidance=0"):
        sample.run(compose_config("sample", [f"checkpoint={last}", "guidance=1", "device=cpu"]))


def test_an_image_folder_records_its_own_provenance(checkpoint: Path, tmp_path: Path) -> None:
    from lt_diffusion import sample

    folder = sample.run(
        compose_config(
            "sample",
            [
                f"checkpoint={checkpoint}",
                "n_per_class=2",
                "sampler.sampler.steps=2",
                "seed=5",
                "device=cpu",
                f"out_dir={tmp_path / 'imgs'}",
            ],
        )  # fmt: skip
    )
    own = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0")
    record = _evaluate(
        None, tmp_path, f"images={folder}", "checkpoint=null", "eval.per_split.generated=0"
    )
    assert record["sampler"]["name"] == "ddim2" and record["sampler"]["sampler"]["steps"] == 2
    assert record["checkpoint"]["images"]["seed"] == 5
    assert len(record["checkpoint"]["images"]["sha256"]) == 64
    assert record["identity"]["digest"] != own["identity"]["digest"]
    names = {p.name for p in (checkpoint.parent.parent / "records").glob("quick-*.json")}
    assert f"quick-images-w0-{record['identity']['digest']}.json" in names
    assert f"quick-ddim3-w0-{own['identity']['digest']}.json" in names


def test_real_features_are_keyed_by_the_pixels_not_the_dataset_name(
    checkpoint: Path, tmp_path: Path
) -> None:
    from tests.fakedata import write_cifar10

    # Same dataset name, same counts, other pixels under another data root: other features.
    other = tmp_path / "other_root"
    write_cifar10(other / "cifar10", n_per_class=20, seed=99)
    a = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0")
    b = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0", f"data_root={other}")
    assert a["metrics"]["overall"]["fid"] != b["metrics"]["overall"]["fid"]
    assert a["identity"]["digest"] == b["identity"]["digest"]  # a location defines no record
    again = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0")
    assert again["metrics"]["overall"]["fid"] == a["metrics"]["overall"]["fid"]


def test_a_failed_save_keeps_the_old_record_and_shows_the_results(
    checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from lt_diffusion import evaluate

    target = tmp_path / "kept.json"
    old = _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0", f"record={target}")
    before = target.read_bytes()

    def full_disk(path, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lt_diffusion.evaluation.run.write_record", full_disk)
    capsys.readouterr()
    with pytest.raises(evaluate.RecordSaveError, match=r"kept.json .*No space left.*untouched"):
        _evaluate(checkpoint, tmp_path, "eval.per_split.generated=0", f"record={target}")
    printed = capsys.readouterr().out
    assert "overall" in printed and '"identity"' in printed  # the table, then the record
    assert target.read_bytes() == before and old["metrics"]["overall"]["fid"] > 0
