"""End to end on a tiny CIFAR-10 written in the real pickle format: train, checkpoint, kill,
resume, sample; and the early, clear errors."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from lt_diffusion.runs.checkpoint import CheckpointError, read_checkpoint
from tests.conftest import compose_config, python_process

RUN = "cifar10_lt-ir10-ddpm-seed0"


def _step(ckpt: Path) -> int:
    return int(read_checkpoint(ckpt)["global_step"]) if ckpt.exists() else -1


def test_train_kill_resume_and_sample(train_overrides, tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "runs" / RUN
    last = run_dir / "checkpoints" / "last.ckpt"

    # 1. A long run, killed hard (SIGKILL: no chance to clean up) after its first checkpoints.
    proc = python_process(["-m", "lt_diffusion.train", *train_overrides("train.max_steps=100000")])
    deadline = time.time() + 240
    while _step(last) < 10:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint at step >= 10 in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    log1 = proc.communicate()[0]
    killed_at = _step(last)  # the file in place is a complete checkpoint
    assert killed_at >= 10, log1
    assert "Imb" in log1 or "many" in log1.lower()  # the dataset summary was printed
    assert (run_dir / "config.yaml").is_file()

    # 2. The same command resumes from that checkpoint, not from step 0.
    target = killed_at + 7
    proc = python_process(
        [
            "-m",
            "lt_diffusion.train",
            *train_overrides(f"train.max_steps={target}", "train.grid_every=0"),
        ]
    )
    log2 = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log2
    assert f"Resuming from {last} at step {killed_at}" in log2
    # Hydra's launch record, written by the lock holder: this attempt's overrides and its log.
    assert f"train.max_steps={target}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert f"Resuming from {last} at step {killed_at}" in (run_dir / "train.log").read_text()
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] == target
    meta = ckpt["lt_diffusion"]
    assert meta["dataset"]["class_counts"][0] == 20 and meta["dataset"]["class_counts"][-1] == 2
    assert meta["config"]["model"]["ch"] == 32
    grid = Image.open(run_dir / "samples" / "latest.png")  # drawn at train end
    assert grid.size[1] > grid.size[0]  # 10 rows (classes) of 2 images

    # 3. Sampling from the checkpoint: N images per class, deterministic in the seed.
    out = tmp_path / "samples_a"
    proc = python_process(
        [
            "-m",
            "lt_diffusion.sample",
            f"checkpoint={last}",
            "n_per_class=2",
            "seed=3",
            "sampler.sampler.steps=4",
            f"out_dir={out}",
        ]
    )
    log3 = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log3
    from lt_diffusion import sample
    from lt_diffusion.utils.imagefolder import read_image_folder

    a, la, meta_a = read_image_folder(out)
    assert a.shape == (20, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(la, torch.arange(10).repeat_interleave(2))
    base = [f"checkpoint={last}", "n_per_class=2", "sampler.sampler.steps=4", "device=cpu"]
    b, _, _ = read_image_folder(
        sample.run(compose_config("sample", [*base, "seed=3", f"out_dir={tmp_path / 'b'}"]))
    )
    c, _, _ = read_image_folder(
        sample.run(compose_config("sample", [*base, "seed=4", f"out_dir={tmp_path / 'c'}"]))
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert meta_a["global_step"] == target


def _train_in_process(overrides: list[str], run_dir: Path):
    from lt_diffusion import train

    cfg = compose_config("train", [*overrides, f"paths.run_dir={run_dir}"])
    return train.run(cfg)


def test_missing_data_root_names_the_folder(train_overrides, tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        _train_in_process(
            train_overrides(f"paths.data_root={empty}", "train.max_steps=1"), tmp_path / "r"
        )


def test_ratio_below_one_is_refused(train_overrides, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ratio"):
        _train_in_process(
            train_overrides("imbalance.ratio=0.5", "train.max_steps=1"), tmp_path / "r"
        )


def test_corrupt_checkpoint_stops_before_training(train_overrides, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="delete it to restart"):
        _train_in_process(train_overrides("train.max_steps=2"), run_dir)
    # The bad file is reported, not replaced.
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"PK\x03\x04 truncated"


def test_mismatched_checkpoint_is_refused(train_overrides, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    _train_in_process(train_overrides("train.max_steps=2"), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match="model"):
        _train_in_process(
            train_overrides("train.max_steps=4", "model.ch=64"),
            run_dir,
        )
    assert last.read_bytes() == before


def test_sampling_a_foreign_file_says_what_is_wrong(tmp_path: Path) -> None:
    from lt_diffusion import sample

    bad = tmp_path / "x.ckpt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="not written by lt-diffusion"):
        sample.run(compose_config("sample", [f"checkpoint={bad}", "device=cpu"]))
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        sample.run(compose_config("sample", [f"checkpoint={tmp_path / 'no.ckpt'}"]))


def test_fine_tuning_method_without_init_from_is_refused(train_overrides, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.init_from"):
        _train_in_process(train_overrides("method=cbdm_lora", "train.max_steps=1"), tmp_path / "r")


def test_only_trainable_modules_in_eval_mode_are_reported(train_overrides, tmp_path) -> None:
    """The EMA copy is in eval mode by design and no warning says otherwise (Lightning's count of
    eval-mode modules is silenced); a trainable module left in eval mode is named."""
    import warnings

    from lt_diffusion import train
    from lt_diffusion.runs.build import build_model, build_objective, build_schedule
    from lt_diffusion.training.module import DiffusionModule

    cfg = compose_config(
        "train", train_overrides("train.max_steps=1", f"paths.run_dir={tmp_path / 'run'}")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.run(cfg)
    eval_mode = [str(w.message) for w in caught if "eval mode" in str(w.message)]
    assert not eval_mode, eval_mode

    module = DiffusionModule(
        build_model(cfg), build_objective(cfg), build_schedule(cfg), torch.optim.Adam
    )
    module.train()
    module.model.head.eval()
    with pytest.warns(UserWarning, match=r"1 trainable module\(s\) are in eval mode .*model\.head"):
        module.on_train_start()


def test_a_run_saved_before_its_objective_moved_is_the_same_run() -> None:
    from lt_diffusion.runs.checkpoint import config_differences

    def config(target: str) -> dict:
        return {"method": {"objective": {"_target_": target, "cond_drop_prob": 0.1}}}

    now = "lt_diffusion.methods.ddpm.DDPMObjective"
    before = "lt_diffusion.methods.DDPMObjective"  # the configs' path before issue 26
    assert config_differences(config(before), config(now)) == []
    for other in ("lt_diffusion.methods.cbdm.CBDMObjective", "lt_diffusion.methods.Gone"):
        assert config_differences(config(other), config(now)) == [
            f"method.objective._target_: checkpoint has {other!r}, config has {now!r}"
        ]
