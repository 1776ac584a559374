"""``python -m lt_diffusion.table`` with the local launcher: a tiny table runs, renders, launches
nothing the second time, relaunches only a run whose record was deleted, shows a failed run
with its log, and refuses bad input before anything is launched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.tables_fixture import TINY_EVAL, tiny_table_overrides, write_tiny_table


def _table(
    configs: Path, out: Path, *args: str, table: str = "tiny", evaluation: list[str] = TINY_EVAL
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "lt_diffusion.table", f"table={table}",
        f"hydra.searchpath=[file://{configs}]", f"paths.output_dir={out}",
        f"eval_overrides=[{','.join(json.dumps(o) for o in evaluation)}]", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _manifests(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("sweeps/tiny/*/manifest.json"))]


def test_sweep_runs_once_relaunches_only_a_deleted_record_and_shows_failures(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    configs = write_tiny_table(tmp_path / "configs")
    out = tmp_path / "outputs"
    train = tiny_table_overrides(tiny_cifar, "train.max_steps=3")

    first = _table(configs, out, *train, "workers=2")  # the two runs side by side
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = sorted(out.glob("runs/*/records/*.json"))
    assert [r.parent.parent.name for r in records] == [
        "cifar10_lt-ir10-cbdm-seed0",
        "cifar10_lt-ir10-ddpm-seed0",
    ]
    assert len(_manifests(out)) == 1 and len(_manifests(out)[0]["jobs"]) == 2
    md = (out / "tables" / "tiny.md").read_text()
    for r in records:
        assert f"{json.loads(r.read_text())['metrics']['overall']['fid']:.2f}" in md
    assert (out / "tables" / "tiny.tex").is_file() and (out / "tables" / "tiny.csv").is_file()
    # The runs are at IR 10 under a block labelled IR=100: the table says what it ran with.
    assert "**Run with overrides**" in md and "train `imbalance=ir10` `model=unet_tiny`" in md
    assert (
        r"Run with overrides: train \texttt{imbalance=ir10}"
        in (out / "tables" / "tiny.tex").read_text()
    )

    # Everything is done: nothing is launched.
    again = _table(configs, out, *train)
    assert again.returncode == 0 and "2 done, 0 to run" in again.stdout, again.stdout[-2000:]
    assert len(_manifests(out)) == 1

    # One record deleted: only its run goes again (resuming its finished training).
    records[0].unlink()
    third = _table(configs, out, *train)
    assert third.returncode == 0, third.stderr[-3000:]
    manifests = _manifests(out)
    assert len(manifests) == 2 and [j["key"] for j in manifests[1]["jobs"]] == [
        [j["key"] for j in manifests[0]["jobs"] if "cbdm" in j["key"]][0]
    ]
    assert records[0].is_file()

    # A run that fails shows as failed with the path of its log; the table still renders.
    ddpm = next(r for r in records if "ddpm" in str(r))
    ddpm.unlink()
    broken = [
        o.replace(f"paths.data_root={tiny_cifar}", f"paths.data_root={tmp_path / 'nowhere'}")
        for o in train
    ]
    bad = _table(configs, out, *broken)
    assert bad.returncode == 0, bad.stderr[-3000:]
    failure = json.loads((ddpm.parent.parent / "failed.json").read_text())
    assert "nowhere" in failure["error"] and Path(failure["log"]).is_file()
    csv = (out / "tables" / "tiny.csv").read_text()
    # Both columns of the DDPM row are failed; the CBDM row keeps its numbers.
    assert csv.count(",failed,") == 2 and csv.count(",ok,") == 2 and failure["log"] in csv, csv


def test_the_runs_rows_start_from_train_first_in_their_own_wave(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """A spec's ``requires:`` run (a DDPM teacher, in no column) trains in a first wave, without
    a record; the row that distils it (``train.init_from``) in a second; the table shows the
    row's number, and a second call launches nothing."""
    configs = tmp_path / "configs"
    (configs / "table").mkdir(parents=True)
    spec = {
        "name": "tiny", "title": "Tiny distillation (tests)", "seeds": [0], "eval": "quick",
        "sampler": {"group": "consistency", "steps": 1},
        "requires": ["cm/cifar10_lt_ir100_ddpm"],
        "columns": [{"key": "fid", "label": "FID", "metric": "overall.fid", "better": "lower"}],
        "blocks": [{"label": "", "rows": [
            {"label": "CD", "experiment": "cm/cifar10_lt_ir100_cd", "published": [10.523]},
        ]}],
    }  # fmt: skip
    (configs / "table" / "tiny.yaml").write_text(json.dumps(spec))
    out = tmp_path / "outputs"
    train = tiny_table_overrides(tiny_cifar, "train.max_steps=2")
    one_step = [o for o in TINY_EVAL if not o.startswith("eval.sampler.steps=")]  # the spec's
    first = _table(configs, out, *train, evaluation=one_step)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "tiny: 2 runs, 0 done, 2 to run" in first.stdout
    waves = sorted(out.glob("sweeps/tiny/*/wave*/manifest.json"))
    assert [[j["key"] for j in json.loads(p.read_text())["jobs"]] for p in waves] == [
        ["cm/cifar10_lt_ir100_ddpm/seed0"],
        ["cm/cifar10_lt_ir100_cd/seed0"],
    ]
    teacher = out / "runs" / "cifar10_lt-ir10-ddpm-seed0"
    assert (teacher / "checkpoints" / "last.ckpt").is_file() and not (teacher / "records").exists()
    (record,) = out.glob("runs/cifar10_lt-ir10-cd-seed0/records/*.json")
    fid = json.loads(record.read_text())["metrics"]["overall"]["fid"]
    md = (out / "tables" / "tiny.md").read_text()
    assert f"{fid:.2f}" in md and "the rows start from: `cm/cifar10_lt_ir100_ddpm`" in md
    assert (
        r"start from: \texttt{cm/cifar10\_lt\_ir100\_ddpm}"
        in (out / "tables" / "tiny.tex").read_text()
    )

    again = _table(configs, out, *train, evaluation=one_step)
    assert again.returncode == 0 and "2 done, 0 to run" in again.stdout, again.stdout[-2000:]


@pytest.mark.parametrize(
    ("table", "args", "message"),
    [
        ("no_such_table", [], "no_such_table"),
        ("tiny", ["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2"], "tasks_per_node=1"),
    ],
)
def test_bad_input_is_refused_before_anything_is_launched(
    table: str, args: list[str], message: str, tiny_cifar: Path, tmp_path: Path
) -> None:
    configs = write_tiny_table(tmp_path / "configs")
    out = tmp_path / "outputs"
    res = _table(configs, out, *tiny_table_overrides(tiny_cifar), *args, table=table)
    assert res.returncode != 0 and message in res.stdout + res.stderr
    assert not list(out.glob("sweeps/**/manifest.json")) and not (out / "runs").exists()


def test_a_table_naming_a_missing_experiment_is_refused(tiny_cifar: Path, tmp_path: Path) -> None:
    configs = write_tiny_table(tmp_path / "configs", experiments={"ddpm": "cm/no_such_row"})
    out = tmp_path / "outputs"
    res = _table(configs, out, *tiny_table_overrides(tiny_cifar))
    assert res.returncode != 0 and "cm/no_such_row" in res.stdout + res.stderr
    assert not (out / "runs").exists()
