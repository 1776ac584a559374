"""Table specs, their resolution into runs and records, aggregation over seeds (checked against
numbers computed here with numpy) and the Markdown / LaTeX / CSV renderings."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from lt_diffusion.evaluation.record import SCHEMA_VERSION, write_record
from lt_diffusion.tables import (
    TableSpecError,
    available_tables,
    collect,
    load_table,
    load_table_by_name,
    metric_value,
    resolve,
    to_csv,
    to_latex,
    to_markdown,
    write_table,
)
from lt_diffusion.utils.config import CONFIG_DIR

ALL_TABLES = available_tables()


def test_every_paper_table_is_there() -> None:
    expected = {f"cm_table{i}" for i in range(1, 8)} | {
        "cm_table_e2", "cm_table_g9", "cm_table_g10", "cm_table_g12", "pd_cbdm_ablation",
    }  # fmt: skip
    assert expected <= set(ALL_TABLES)


@pytest.mark.parametrize("name", ALL_TABLES)
def test_table_specs_load_and_name_existing_experiments(name: str) -> None:
    spec = load_table_by_name(name)
    assert spec.name == name and spec.columns and spec.seeds
    for block in spec.blocks:
        for row in block.rows:
            assert any(v is not None for v in row.published.values()), (
                f"{row.label}: no published value"
            )
            for exp in row.experiments.values():
                assert (CONFIG_DIR / "experiment" / f"{exp}.yaml").is_file()


def test_table7_evaluates_the_cm_run_twice_but_trains_it_once(tmp_path: Path) -> None:
    spec = load_table_by_name("cm_table7")
    spec.seeds = [0]
    cm_runs = [r for r in spec.runs() if r.experiment == "cm/cifar100_lt_ir100_cm"]
    assert len(cm_runs) == 1
    resolved = {r.run: r for r in resolve(spec, [f"paths.output_dir={tmp_path}"])}
    records = resolved[cm_runs[0]].records
    names = sorted(p.name for p in records.values())
    assert names == ["cm_paper-ddim50-w1.5-theta_g.json", "cm_paper-ddim50-w1.5.json"]
    assert resolved[cm_runs[0]].run_dir == tmp_path / "runs" / "cifar100_lt-ir100-cm-seed0"
    assert not resolved[cm_runs[0]].done


def _spec(**row_extra) -> dict:
    return {
        "name": "t",
        "title": "T",
        "seeds": [0, 1, 2],
        "eval": "quick",
        "columns": [
            {"key": "fid", "metric": "overall.fid", "better": "lower", "digits": 2},
            {"key": "few", "metric": "per_split.few.fid", "better": "lower"},
            {"key": "male", "metric": "per_class.class_001.fid", "better": "lower"},
            {"key": "recall", "metric": "overall.recall", "better": "higher"},
        ],
        "blocks": [
            {
                "label": "B",
                "rows": [
                    {
                        "label": "DDPM",
                        "experiment": "cm/cifar10_lt_ir100_ddpm",
                        "published": [10.7, 15.9, None, 0.47],
                    },
                    {
                        "label": "CBDM",
                        "experiment": "cm/cifar10_lt_ir100_cbdm",
                        "published": {"fid": 8.2},
                    },
                    {"label": "OC", "experiment": "cm/cifar10_lt_ir100_oc", **row_extra},
                    {
                        "label": "CM++",
                        "missing": "not implemented",
                        "published": [6.0, None, None, None],
                    },
                ],
            }
        ],
    }


def _entry(v: float) -> dict:
    return {"n_generated": 10, "n_real": 10, "fid": v, "recall": v / 100, "pr_k": 3}


def _record(fid: float) -> dict:
    return {
        "schema": SCHEMA_VERSION, "code_version": "test", "config": {},
        "dataset": {"name": "d", "class_counts": [5, 1], "splits": ["many", "few"]},
        "checkpoint": {"path": "x", "step": 1}, "sampler": {"guidance": 1.0}, "protocol": {},
        "extractor": {"weights_sha256": "0", "has_logits": False},
        "metrics": {"overall": _entry(fid), "per_split": {"few": _entry(fid + 1)},
                    "per_class": {"class_001": _entry(fid + 2)}},
    }  # fmt: skip


@pytest.fixture
def filled(tmp_path: Path):
    """The spec above resolved under tmp_path, with records: DDPM 3 seeds, CBDM 2, OC none."""
    spec = load_table(_spec())
    resolved = resolve(spec, [f"paths.output_dir={tmp_path}"])
    fids = {"cm/cifar10_lt_ir100_ddpm": [9.0, 10.0, 12.5], "cm/cifar10_lt_ir100_cbdm": [7.0, 8.5]}
    for r in resolved:
        values = fids.get(r.run.experiment, [])
        if r.run.seed < len(values):
            for path in r.records.values():
                write_record(path, _record(values[r.run.seed]))
    return spec, resolved, fids


def test_mean_std_published_difference_and_ranks(filled) -> None:
    spec, resolved, fids = filled
    result = collect(spec, resolved, failures={"cm/cifar10_lt_ir100_oc/seed1": "/logs/oc.log"})
    ((_, rows),) = result.blocks
    cells = {row.label: c for row, c in rows}

    ddpm = np.array(fids["cm/cifar10_lt_ir100_ddpm"])
    c = cells["DDPM"]["fid"]
    assert c.status == "ok" and c.values == ddpm.tolist()
    assert c.mean == pytest.approx(ddpm.mean()) and c.std == pytest.approx(ddpm.std(ddof=1))
    assert c.diff == pytest.approx(ddpm.mean() - 10.7)
    assert cells["DDPM"]["few"].mean == pytest.approx((ddpm + 1).mean())
    assert cells["DDPM"]["male"].mean == pytest.approx((ddpm + 2).mean())
    assert cells["DDPM"]["male"].published is None

    cbdm = np.array(fids["cm/cifar10_lt_ir100_cbdm"])
    assert cells["CBDM"]["fid"].status == "partial" and cells["CBDM"]["fid"].n_expected == 3
    assert cells["CBDM"]["fid"].mean == pytest.approx(cbdm.mean())
    # Lower FID is better: CBDM best, DDPM second; higher recall is better: DDPM best.
    assert (cells["CBDM"]["fid"].rank, cells["DDPM"]["fid"].rank) == (1, 2)
    assert (cells["DDPM"]["recall"].rank, cells["CBDM"]["recall"].rank) == (1, 2)

    assert cells["OC"]["fid"].status == "failed" and cells["OC"]["fid"].log == "/logs/oc.log"
    assert (
        cells["CM++"]["fid"].status == "missing" and cells["CM++"]["fid"].note == "not implemented"
    )


def test_renderings_carry_the_numbers(filled, tmp_path: Path) -> None:
    spec, resolved, fids = filled
    result = collect(spec, resolved)
    ddpm = np.array(fids["cm/cifar10_lt_ir100_ddpm"])
    md = to_markdown(result)
    assert f"**{np.array(fids['cm/cifar10_lt_ir100_cbdm']).mean():.2f}" in md
    # DDPM is second best: underlined.
    assert (
        f"<u>{ddpm.mean():.2f} ± {ddpm.std(ddof=1):.2f}</u> (10.70, {ddpm.mean() - 10.7:+.2f})"
        in md
    )
    assert "[2/3 seeds]" in md and "pending" in md and "missing: not implemented" in md
    tex = to_latex(result)
    assert r"\textbf{7.75$\pm$1.06}" in tex and r"\underline{" in tex and r"\toprule" in tex
    rows = list(csv.DictReader(io.StringIO(to_csv(result))))
    assert len(rows) == 4 * 4
    ddpm_fid = next(r for r in rows if r["row"] == "DDPM" and r["column"] == "fid")
    assert float(ddpm_fid["mean"]) == pytest.approx(ddpm.mean()) and ddpm_fid["status"] == "ok"
    paths = write_table(result, tmp_path / "tables")
    assert {p.name for p in paths.values()} == {"t.md", "t.tex", "t.csv"}
    assert paths["md"].read_text() == md


def test_metric_paths_read_the_record() -> None:
    rec = _record(3.0)
    assert metric_value(rec, "overall.fid") == 3.0
    assert metric_value(rec, "per_split.few.fid") == 4.0
    assert metric_value(rec, "per_class.1.fid") == 5.0
    assert metric_value(rec, "per_split.many.fid") is None
    assert metric_value(rec, "overall.is") is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"columns": [{"key": "fid", "metric": "overall.fidd"}]}, "not a record metric path"),
        ({"seeds": []}, "at least one seed"),
        ({"blocks": [{"rows": [{"label": "X", "experiment": "cm/nope"}]}]}, "cm/nope"),
        ({"blocks": [{"rows": [{"label": "X", "experiment": "cm/cifar10_lt_ir100_ddpm", "published": [1, 2]}]}]},
         "2 values for 4 columns"),
        ({"blocks": [{"rows": [{"label": "X"}]}]}, "needs experiment"),
    ],
)  # fmt: skip
def test_bad_specs_say_what_to_fix(change: dict, message: str) -> None:
    with pytest.raises(TableSpecError, match=message):
        load_table({**_spec(), **change})


def test_unknown_table_lists_the_available_ones() -> None:
    with pytest.raises(TableSpecError, match="cm_table2"):
        load_table_by_name("cm_table99")


def test_a_run_that_does_not_compose_is_named(tmp_path: Path) -> None:
    spec = load_table(_spec(overrides=["model.no_such_key=1"]))
    with pytest.raises(TableSpecError, match="cm/cifar10_lt_ir100_oc"):
        resolve(spec, [f"paths.output_dir={tmp_path}"])
