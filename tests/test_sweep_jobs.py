"""Sweep jobs without a table: the launcher checks, the manifest, and one job's life (train,
evaluate, skip when done, record a failure without raising, two gloo processes -> one record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import OmegaConf

from lt_diffusion.runs.checkpoint import read_checkpoint
from lt_diffusion.tables.sweep import (
    FAILED,
    SWEEP_LOG_ENV,
    EvalJob,
    Job,
    LauncherConfigError,
    check_launcher,
    claim,
    launch,
    read_failure,
    read_manifest,
    write_manifest,
)
from tests.conftest import ROOT
from tests.tables_fixture import TINY_EVAL


def slurm_launcher(**overrides) -> dict:
    """configs/hydra/launcher/slurm.yaml over the plugin's defaults, as Hydra composes it."""
    body = yaml.safe_load((ROOT / "configs/hydra/launcher/slurm.yaml").read_text())
    body.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), body, overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def job(key: str = "x/seed0", devices: int = 1, nodes: int = 1, run_dir: str = "r") -> Job:
    return Job(key=key, train_overrides=[], run_dir=run_dir, devices=devices, num_nodes=nodes)


def test_slurm_tasks_and_nodes_must_match_the_trainer() -> None:
    check_launcher(slurm_launcher(tasks_per_node=2), [job(devices=2)])
    with pytest.raises(LauncherConfigError, match=r"tasks_per_node=2 hydra.launcher.nodes=1"):
        check_launcher(slurm_launcher(), [job("a/seed0"), job("b/seed0", devices=2)])
    with pytest.raises(LauncherConfigError, match="trainer.num_nodes=2"):
        check_launcher(slurm_launcher(), [job(nodes=2)])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"timeout_min": 0}, "timeout_min must be a positive integer"),
        ({"nodes": 0}, "nodes must be a positive integer"),
        ({"mem_gb": -4}, "mem_gb must be a positive integer"),
        ({"array_parallelism": 0}, "array_parallelism must be >= 1"),
    ],
)
def test_bad_launcher_settings_are_refused(setting: dict, message: str) -> None:
    with pytest.raises(LauncherConfigError, match=message):
        check_launcher(slurm_launcher(**setting), [job()])


def test_side_by_side_workers_are_for_the_local_launcher() -> None:
    local = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    check_launcher(local, [job()], workers=2)
    with pytest.raises(LauncherConfigError, match="array_parallelism"):
        check_launcher(slurm_launcher(), [job()], workers=2)
    with pytest.raises(LauncherConfigError, match="workers must be >= 1"):
        check_launcher(local, [job()], workers=0)


def test_the_local_launcher_accepts_multi_device_runs() -> None:
    check_launcher(
        {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, [job(devices=4)]
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    jobs = [
        Job(
            "a/seed0",
            ["experiment=a", "seed=0"],
            "runs/a",
            1,
            1,
            [EvalJob(["eval=quick"], "r.json")],
        ),
        Job("b/seed1", ["experiment=b", "seed=1"], "runs/b", 2, 1),
    ]
    path = write_manifest(tmp_path / "m.json", "t", jobs)
    assert read_manifest(path) == ("t", jobs)
    assert jobs[1].world_size == 2
    with pytest.raises(FileNotFoundError, match="lt_diffusion.table"):
        read_manifest(tmp_path / "missing.json")


def _job_for(train_overrides, run_dir: Path, *extra: str, devices: int = 1) -> Job:
    record = run_dir / "records" / "quick.json"
    overrides = [
        *train_overrides(*extra), "train.max_steps=3", "train.grid_per_class=1",
        "train.grid_steps=2", f"paths.cache_dir={run_dir.parent.parent / 'cache'}",
    ]  # fmt: skip
    return Job(
        key=f"{run_dir.name}/seed0",
        train_overrides=overrides,
        run_dir=str(run_dir),
        devices=devices,
        num_nodes=1,
        evaluations=[
            EvalJob([*TINY_EVAL, f"paths.cache_dir={run_dir.parent.parent / 'cache'}"], str(record))
        ],
    )


def _run_job(manifest: Path, index: int, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lt_diffusion.job", f"manifest={manifest}", f"job={index}",
         f"paths.output_dir={tmp_path / 'outputs'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, SWEEP_LOG_ENV: str(tmp_path / "jobs.log")},
    )  # fmt: skip


def test_a_failing_job_records_its_failure_and_a_done_job_is_skipped(
    train_overrides, tmp_path: Path
) -> None:
    runs = tmp_path / "outputs" / "runs"
    bad = _job_for(train_overrides, runs / "bad", "imbalance.ratio=0.5")
    good = _job_for(train_overrides, runs / "good")
    Path(good.evaluations[0].record).parent.mkdir(parents=True)
    Path(good.evaluations[0].record).write_text("{}")  # its record exists: nothing to do
    manifest = write_manifest(tmp_path / "manifest.json", "t", [bad, good])

    out = _run_job(manifest, 0, tmp_path)
    assert out.returncode == 0, out.stderr  # a failed run never stops the sweep
    failure = read_failure(bad.run_dir)
    assert failure is not None and "ratio" in failure["error"]
    assert "Traceback" in failure["traceback"] and failure["log"] == str(tmp_path / "jobs.log")

    out = _run_job(manifest, 1, tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (Path(good.run_dir) / "checkpoints").exists()  # skipped: no training
    assert read_failure(good.run_dir) is None


def test_a_job_is_claimed_once(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    assert claim(claims, 3) and not claim(claims, 3) and claim(claims, 4)
    assert str(os.getpid()) in (claims / "job3").read_text()


def test_side_by_side_workers_run_each_job_once_whoever_is_free(
    train_overrides, tmp_path: Path
) -> None:
    """Two local workers over five jobs (each failing at once on a bad ratio): every job runs
    exactly once, claimed by one worker, and the workers write no .hydra folder over another's
    job."""
    runs = tmp_path / "outputs" / "runs"
    jobs = [_job_for(train_overrides, runs / f"r{i}", "imbalance.ratio=0.5") for i in range(5)]
    manifest = write_manifest(tmp_path / "sweep" / "manifest.json", "t", jobs)
    code = launch(manifest, len(jobs), [], tmp_path / "sweep", workers=2)
    assert code == 0
    log = (tmp_path / "sweep" / "jobs.log").read_text()
    for j in jobs:
        assert read_failure(j.run_dir) is not None
        assert log.count(f"[{j.key}] failed") == 1, log[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep" / "claims").iterdir()) == [
        f"job{i}" for i in range(5)
    ]
    assert not list((tmp_path / "sweep").glob("job*/.hydra"))


def test_two_gloo_processes_train_evaluate_and_write_one_record(
    train_overrides, tmp_path: Path
) -> None:
    """A two-device job on the local launcher runs under torchrun (gloo on the CPU)."""
    run_dir = tmp_path / "outputs" / "runs" / "ddp"
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
    ]
    j = _job_for(train_overrides, run_dir, *ddp, devices=2)
    (run_dir).mkdir(parents=True)
    (run_dir / FAILED).write_text("{}")  # an earlier failure, cleared by success
    manifest = write_manifest(tmp_path / "manifest.json", "t", [j])
    out = _run_job(manifest, 0, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting with 2 processes" in out.stdout + out.stderr
    records = list((run_dir / "records").glob("*.json"))
    assert [r.name for r in records] == ["quick.json"]
    record = json.loads(records[0].read_text())
    assert (
        record["checkpoint"]["step"]
        == 3
        == read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    )
    assert record["config"]["trainer"]["devices"] == 2
    assert not (run_dir / FAILED).exists()


def test_wandb_runs_are_grouped_by_table_and_experiment(tmp_path: Path) -> None:
    from lt_diffusion.tables.job import train_config

    j = Job(
        "cm/cifar10_lt_ir100_cm/seed2",
        ["experiment=cm/cifar10_lt_ir100_cm", "seed=2"],
        str(tmp_path),
        1,
        1,
    )
    cfg = train_config(j, "cm_table2")
    assert cfg.logger.group == "cm_table2" and cfg.logger.job_type == "cm/cifar10_lt_ir100_cm"
    assert cfg.logger.offline is True and cfg.paths.run_dir == str(tmp_path)
    csv = train_config(Job("a/seed0", ["logger=csv"], str(tmp_path), 1, 1), "t")
    assert "group" not in csv.logger


def test_an_analysis_record_is_made_by_ltd_analyze_after_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's ``command: analyze`` evaluation composes the analyze config with its overrides,
    the checkpoint, the record path and the data root, and runs lt_diffusion.analysis.run
    (training and the checkpoint are stand-ins here: the analysis itself runs in
    test_every_row)."""
    from lt_diffusion.analysis import run as analyze
    from lt_diffusion.evaluation import run as evaluate
    from lt_diffusion.tables import job
    from lt_diffusion.training import run as train

    calls: list = []
    monkeypatch.setattr(train, "run", lambda cfg: calls.append(("train", cfg.paths.run_dir)))
    monkeypatch.setattr(job, "read_checkpoint", lambda path: {"global_step": 3})
    monkeypatch.setattr(analyze, "run", lambda cfg: calls.append(("analyze", cfg)))
    monkeypatch.setattr(evaluate, "run", lambda cfg: calls.append(("evaluate", cfg)))
    record = tmp_path / "run" / "analyses" / "concept_dominance-0.json"
    one = Job(
        key="r/seed0", train_overrides=["model=unet_tiny"], run_dir=str(tmp_path / "run"),
        devices=1, num_nodes=1,
        evaluations=[EvalJob(["analysis=concept_dominance", "analysis.lora_scale=0"],
                             str(record), command="analyze")],
    )  # fmt: skip
    assert job.run_job(one, "t") == "done"
    (kind, run_dir), (what, cfg) = calls
    assert (kind, run_dir, what) == ("train", str(tmp_path / "run"), "analyze")
    assert cfg.analysis.name == "concept_dominance" and cfg.analysis.lora_scale == 0
    assert cfg.record == str(record) and cfg.checkpoint.endswith("run/checkpoints/last.ckpt")
    assert cfg.data_root
    # Manifests round-trip the command (and old ones without it are evaluations).
    manifest = write_manifest(tmp_path / "m.json", "t", [one])
    assert read_manifest(manifest)[1][0].evaluations[0].command == "analyze"
    assert EvalJob(["eval=quick"], "r.json").command == "evaluate"
