"""Table specs, their resolution into runs and records, aggregation over seeds (checked against
numbers computed here with numpy) and the Markdown / LaTeX / CSV renderings."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lt_diffusion.analysis.concept_dominance import ConceptDominanceSettings
from lt_diffusion.evaluation.record import conventions
from lt_diffusion.records.base import SCHEMA_VERSION, write_record
from lt_diffusion.tables import (
    TableSpecError,
    available_tables,
    collect,
    load_table,
    load_table_by_name,
    metric_entry,
    metric_value,
    resolve,
    to_csv,
    to_latex,
    to_markdown,
    write_table,
)
from lt_diffusion.utils.config import CONFIG_DIR
from lt_diffusion.utils.io import atomic_write_json as write_json

ALL_TABLES = available_tables()
# Tables of numbers no paper publishes for these rows (ours only).
UNPUBLISHED = {
    "coral_diversity", "dominance_imba", "imba_gamma", "imba_distance_check",
    "imba_pairs_causal", "imba_pairs_size", "imba_pairs_methods", "imba_pairs_gamma",
}  # fmt: skip


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
            # This project's own tables (the synthetic benchmark, the diversity table) have no
            # published numbers.
            unpublished = str(spec.eval).startswith("toy") or name in UNPUBLISHED
            assert unpublished or any(v is not None for v in row.published.values()), (
                f"{row.label}: no published value"
            )
            for exp in row.experiments.values():
                assert (Path(CONFIG_DIR) / "experiment" / f"{exp}.yaml").is_file()


@pytest.mark.parametrize("name", ALL_TABLES)
def test_every_table_is_one_command_from_nothing(name: str, tmp_path: Path) -> None:
    """Every run a table's rows start from (``train.init_from``) is one the table trains (a row
    or a ``requires:`` run), in an earlier launch wave: no table needs another one run first."""
    from lt_diffusion.tables.launch import check_start_points, launch_waves

    spec = load_table_by_name(name)
    spec.seeds = [0]  # the start points name the seed: one is enough
    resolved = resolve(spec, [f"paths.output_dir={tmp_path}"])
    check_start_points(resolved)  # nothing exists under tmp_path
    wave = {
        r.run: k
        for k, group in enumerate(launch_waves(resolved))
        for r in (resolved[i] for i in group)
    }
    trained_by = {r.checkpoint: r.run for r in resolved}
    for r in resolved:
        if r.start_point is not None:
            assert wave[trained_by[r.start_point]] < wave[r.run], r.run.key


def test_table7_evaluates_the_cm_run_twice_but_trains_it_once(tmp_path: Path) -> None:
    spec = load_table_by_name("cm_table7")
    spec.seeds = [0]
    cm_runs = [r for r in spec.runs() if r.experiment == "cm/cifar100_lt_ir100_cm"]
    assert len(cm_runs) == 1
    resolved = {r.run: r for r in resolve(spec, [f"paths.output_dir={tmp_path}"])}
    records = resolved[cm_runs[0]].records
    names = sorted(p.name for p in records.values())
    assert [n.rsplit("-", 1)[0] for n in names] == [
        "cm_paper-ddim50-w1.5",
        "cm_paper-ddim50-w1.5-theta_g",
    ]
    digests = resolved[cm_runs[0]].digests.values()
    assert len(set(digests)) == 2  # the variant is part of what defines a record
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
            {"key": "is", "label": "IS", "metric": "overall.is", "better": "higher"},
        ],
        "blocks": [
            {
                "label": "B",
                "rows": [
                    {
                        "label": "DDPM",
                        "experiment": "cm/cifar10_lt_ir100_ddpm",
                        "published": [10.7, 15.9, None, 0.47, 9.39],
                    },
                    {
                        "label": "CBDM",
                        "experiment": "cm/cifar10_lt_ir100_cbdm",
                        "published": {"fid": 8.2},
                    },
                    {"label": "CM", "experiment": "cm/cifar10_lt_ir100_cm", "published": [7.7] * 5},
                    {"label": "OC", "experiment": "cm/cifar10_lt_ir100_oc", **row_extra},
                    {
                        "label": "CM++",
                        "missing": "not implemented",
                        "published": [6.0, None, None, None, None],
                    },
                ],
            }
        ],
    }


# What an evaluation without Inception logits writes instead of an IS (evaluation/evaluator.py).
IS_WHY = (
    "no logits layer in the offline Inception weights: stage torch-fidelity's weights file to "
    "get IS"
)


def _entry(v: float) -> dict:
    return {"n_generated": 10, "n_real": 10, "fid": v, "recall": v / 100, "pr_k": 3,
            "is": None, "is_unavailable": IS_WHY}  # fmt: skip


def _record(fid: float, digest: str = "0", step: int = 1) -> dict:
    return {
        "schema": SCHEMA_VERSION, "code_version": "test", "config": {},
        "identity": {"digest": digest},
        "dataset": {"name": "d", "class_counts": [5, 1], "splits": ["many", "few"]},
        "checkpoint": {"path": "x", "step": step}, "protocol": {},
        "sampler": {"name": "ddim20", "guidance": 1.5},
        "extractors": {"inception": {"name": "inception-v3-compat", "weights_sha256": "0"}},
        "reference": {"origin": "dataset", "description": "the balanced training split"},
        "conventions": conventions(1.5),
        "metrics": {"overall": _entry(fid), "per_split": {"few": _entry(fid + 1)},
                    "per_class": {"class_001": _entry(fid + 2)}},
    }  # fmt: skip


# The best FID mean is CBDM's, but only 2 of its 3 seeds have a record: among the complete cells
# CM is best and DDPM second.
FIDS = {
    "cm/cifar10_lt_ir100_ddpm": [9.0, 10.0, 12.5],
    "cm/cifar10_lt_ir100_cbdm": [7.0, 8.5],
    "cm/cifar10_lt_ir100_cm": [8.0, 8.5, 9.0],
}


@pytest.fixture
def filled(tmp_path: Path):
    """The spec above resolved under tmp_path, with records: DDPM and CM 3 seeds, CBDM 2 (seeds
    0, 1), OC none."""
    spec = load_table(_spec())
    resolved = resolve(spec, [f"paths.output_dir={tmp_path}"])
    fids = FIDS
    for r in resolved:
        values = fids.get(r.run.experiment, [])
        if r.run.seed < len(values):
            for ev, path in r.records.items():
                write_record(path, _record(values[r.run.seed], r.digests[ev], r.max_steps))
    return spec, resolved, fids


def _cells(result) -> dict:
    ((_, rows),) = result.blocks
    return {row.label: c for row, c in rows}


def test_mean_std_published_difference_and_ranks(filled) -> None:
    spec, resolved, fids = filled
    result = collect(spec, resolved, failures={"cm/cifar10_lt_ir100_oc/seed1": "/logs/oc.log"})
    cells = _cells(result)

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
    # Only complete cells compete: CBDM's lower 2-seed mean gets no rank. Lower FID is better:
    # CM best, DDPM second; higher recall is better: DDPM best, CM second.
    assert [cells[r]["fid"].rank for r in ("CM", "DDPM", "CBDM")] == [1, 2, None]
    assert [cells[r]["recall"].rank for r in ("DDPM", "CM", "CBDM")] == [1, 2, None]

    assert cells["OC"]["fid"].status == "failed" and cells["OC"]["fid"].failed == {
        1: "/logs/oc.log"
    }
    assert (
        cells["CM++"]["fid"].status == "missing" and cells["CM++"]["fid"].note == "not implemented"
    )
    assert result.guidance == (1.5,)


def test_renderings_carry_the_numbers(filled, tmp_path: Path) -> None:
    spec, resolved, fids = filled
    result = collect(spec, resolved)
    ddpm, cm = np.array(fids["cm/cifar10_lt_ir100_ddpm"]), np.array(fids["cm/cifar10_lt_ir100_cm"])
    cbdm = np.array(fids["cm/cifar10_lt_ir100_cbdm"])
    md = to_markdown(result)
    assert f"| CM | **{cm.mean():.2f} ± {cm.std(ddof=1):.2f}** (7.70, {cm.mean() - 7.7:+.2f})" in md
    assert (
        f"<u>{ddpm.mean():.2f} ± {ddpm.std(ddof=1):.2f}</u> (10.70, {ddpm.mean() - 10.7:+.2f})"
        in md
    )
    # The partial cell is neither bold nor underlined.
    assert f"| CBDM | {cbdm.mean():.2f} ± {cbdm.std(ddof=1):.2f} (8.20, " in md
    assert "[2/3 seeds]" in md and "pending" in md and "missing: not implemented" in md
    assert "guidance w=1.5" in md
    tex = to_latex(result)
    assert rf"\textbf{{{cm.mean():.2f}$\pm${cm.std(ddof=1):.2f}}}" in tex
    assert rf"\underline{{{ddpm.mean():.2f}$\pm${ddpm.std(ddof=1):.2f}}}" in tex
    # The partial cell keeps its seed count and is not ranked in the .tex either.
    assert (
        rf"CBDM & {cbdm.mean():.2f}$\pm${cbdm.std(ddof=1):.2f} {{\scriptsize (8.20)}}"
        r" {\scriptsize [2/3 seeds]} & " in tex
    )
    rows = list(csv.DictReader(io.StringIO(to_csv(result))))
    assert len(rows) == 5 * 5
    ddpm_fid = next(r for r in rows if r["row"] == "DDPM" and r["column"] == "fid")
    assert float(ddpm_fid["mean"]) == pytest.approx(ddpm.mean()) and ddpm_fid["status"] == "ok"
    cbdm_fid = next(r for r in rows if r["row"] == "CBDM" and r["column"] == "fid")
    assert (cbdm_fid["status"], cbdm_fid["rank"]) == ("partial", "")
    paths = write_table(result, tmp_path / "tables")
    assert {p.name for p in paths.values()} == {"t.md", "t.tex", "t.csv"}
    assert paths["md"].read_text() == md


def test_an_unavailable_metric_says_why_in_every_form(filled) -> None:
    """Records without an IS (no Inception logits) make `n/a: <why>` cells, not `pending`."""
    spec, resolved, _ = filled
    result = collect(spec, resolved)
    cells = _cells(result)
    for row in ("DDPM", "CBDM", "CM"):  # CBDM's third seed is pending: it will not have IS either
        assert (cells[row]["is"].status, cells[row]["is"].note) == ("unavailable", IS_WHY)
    assert cells["OC"]["is"].status == "pending"  # no record: nothing is known yet
    md = to_markdown(result)
    assert "| n/a: no logits layer in the offline Inception weights (paper 9.39) |" in md
    tex = to_latex(result)
    mark = r"$^{\mathrm{a}}$"
    assert rf"\emph{{n/a}}{mark} {{\scriptsize (9.39)}}" in tex
    assert rf"{mark}\,IS not available: no logits layer in the offline Inception weights" in tex
    rows = [r for r in csv.DictReader(io.StringIO(to_csv(result))) if r["column"] == "is"]
    assert [(r["row"], r["status"]) for r in rows] == [
        ("DDPM", "unavailable"), ("CBDM", "unavailable"), ("CM", "unavailable"),
        ("OC", "pending"), ("CM++", "missing"),
    ]  # fmt: skip
    assert rows[0]["note"] == IS_WHY


def test_a_failed_seed_shows_in_its_partial_cell(filled) -> None:
    spec, resolved, fids = filled
    log = "/logs/cbdm_seed2.log"
    result = collect(spec, resolved, failures={"cm/cifar10_lt_ir100_cbdm/seed2": log})
    cell = _cells(result)["CBDM"]["fid"]
    assert cell.status == "partial" and cell.failed == {2: log}
    assert f"(8.20, {cell.diff:+.2f}) [2/3 seeds; seed 2 failed: {log}]" in to_markdown(result)
    tex = to_latex(result)
    mark = r"$^{\mathrm{b}}$"  # note a: DDPM's IS, the table's first cell with a note
    assert r"{\scriptsize [2/3 seeds]}" + mark in tex
    assert rf"{mark}\,seed 2 failed, log \texttt{{/logs/cbdm\_seed2.log}}.\par" in tex
    row = next(
        r
        for r in csv.DictReader(io.StringIO(to_csv(result)))
        if (r["row"], r["column"]) == ("CBDM", "fid")
    )
    assert row["log"] == f"seed 2: {log}"


def test_the_overrides_the_table_ran_with_are_shown(filled) -> None:
    spec, resolved, _ = filled
    train, evals = ["imbalance=ir10", "train.max_steps=3"], ["eval.overall.generated=10"]
    result = collect(spec, resolved, train_overrides=train, eval_overrides=evals)
    md = to_markdown(result)
    assert "train `imbalance=ir10` `train.max_steps=3`; eval `eval.overall.generated=10`" in md
    tex = to_latex(result)
    caption = tex[tex.index(r"\caption") : tex.index(r"\label")]
    assert (
        r"Run with overrides: train \texttt{imbalance=ir10}, \texttt{train.max\_steps=3}; "
        r"eval \texttt{eval.overall.generated=10}." in caption
    )
    for row in csv.DictReader(io.StringIO(to_csv(result))):
        assert shlex.split(row["train_overrides"]) == train
        assert shlex.split(row["eval_overrides"]) == evals
    # Without overrides nothing claims there were any.
    assert "overrides" not in to_markdown(collect(spec, resolved)).lower()


def _tex_balanced(tex: str) -> None:
    """Braces balance, every \\begin has its \\end, every line has an even number of $, no
    math holds an escaped underscore (a label that should have been typeset as math)."""
    plain = re.sub(r"\\[{}$%&#_]", "", tex)
    plain = "\n".join(line.split("%")[0] for line in plain.splitlines())  # comments
    depth = 0
    for ch in plain:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a } closes nothing"
    assert depth == 0, "unclosed {"
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", plain):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack.pop() == env
    assert not stack
    for line in plain.splitlines():
        assert line.count("$") % 2 == 0, line
        for math in re.findall(r"\$([^$]*)\$", line):
            assert "\\_" not in math and "textbackslash" not in math, math


def _compile(tmp_path: Path, body: str) -> None:
    """pdflatex a document holding ``body`` (skipped where no LaTeX is installed)."""
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex (apt-get install texlive-latex-recommended)")
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs,amssymb}\n\\begin{document}\n"
        + body
        + "\\end{document}\n"
    )
    res = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]


def test_latex_is_a_complete_float_that_compiles(filled, tmp_path: Path) -> None:
    spec, resolved, _ = filled
    result = collect(
        spec, resolved, {"cm/cifar10_lt_ir100_oc/seed0": "/runs/oc_x/job.log"},
        train_overrides=["train.max_steps=3"],
    )  # fmt: skip
    tex = to_latex(result)
    _tex_balanced(tex)
    lines = tex.splitlines()
    assert lines[1].startswith(r"% Needs \usepackage{booktabs,amssymb} in the preamble")
    assert lines[3] == r"\begin{table}[t]" and lines[-1] == r"\end{table}"
    assert r"\label{tab:t}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    caption = tex[tex.index(r"\caption") : tex.index(r"\label")]
    for part in ("seeds 0, 1, 2", r"Protocol \texttt{quick}", r"sampler \texttt{ddim20}",
                 "guidance $w=1.5$", "in parentheses the published value"):  # fmt: skip
        assert part in caption, part
    header = next(line for line in lines if line.startswith("Method & "))
    assert header == (
        r"Method & fid$\downarrow$ & few$\downarrow$ & male$\downarrow$ & recall$\uparrow$ & "
        r"IS$\uparrow$ \\"
    )
    # Cells without a number are short italic marks; their reasons are notes under the table.
    oc = next(line for line in lines if line.startswith("OC & "))
    assert oc.count(r"\emph{failed}$^{\mathrm{b}}$") == 5
    assert r"$^{\mathrm{b}}$\,seed 0 failed, log \texttt{/runs/oc\_x/job.log}.\par" in tex
    assert r"CM++ & \emph{missing}$^{\mathrm{c}}$ {\scriptsize (6.00)}" in tex
    assert r"$^{\mathrm{c}}$\,not run here: not implemented.\par" in tex
    _compile(tmp_path, tex)


def test_tex_labels_are_typeset_as_math_and_every_table_compiles(tmp_path: Path) -> None:
    texs = [to_latex(collect(load_table_by_name(name), [])) for name in ALL_TABLES]
    for tex in texs:
        _tex_balanced(tex)
    cm7 = texs[ALL_TABLES.index("cm_table7")]
    assert r"\multicolumn{8}{l}{\emph{$\theta^g$ only (per split)}} \\" in cm7
    assert "\nCM ($\\theta^g$) & " in cm7
    assert "\nCM w/o $\\mathcal{L}_{\\mathrm{Con}}$ & " in cm7
    assert "theta\\_g" not in "".join(texs) and "L\\_Con" not in cm7
    _compile(tmp_path, "\n".join(texs))


def test_a_tex_label_that_would_break_the_document_is_refused() -> None:
    spec = _spec()
    spec["blocks"][0]["rows"][0]["tex"] = r"CM w/o $\mathcal{L}_{Con$"
    with pytest.raises(TableSpecError, match=r"row 'DDPM': tex label .* braces"):
        load_table(spec)


def test_metric_paths_read_the_record() -> None:
    rec = _record(3.0)
    assert metric_value(rec, "overall.fid") == 3.0
    assert metric_value(rec, "per_split.few.fid") == 4.0
    assert metric_value(rec, "per_class.1.fid") == 5.0
    assert metric_value(rec, "per_split.many.fid") is None
    assert metric_value(rec, "overall.is") is None
    assert metric_entry(rec, "overall.is") == (None, IS_WHY)
    assert metric_entry(rec, "per_split.many.fid") == (
        None,
        "the record holds no per_split.many.fid",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"columns": [{"key": "fid", "metric": "overall.fidd"}]}, "not a record metric path"),
        ({"seeds": []}, "at least one seed"),
        ({"blocks": [{"rows": [{"label": "X", "experiment": "cm/nope"}]}]}, "cm/nope"),
        ({"blocks": [{"rows": [{"label": "X", "experiment": "cm/cifar10_lt_ir100_ddpm", "published": [1, 2]}]}]},
         "2 values for 5 columns"),
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


def test_a_record_of_other_settings_or_an_unfinished_run_does_not_count(filled) -> None:
    spec, resolved, _ = filled
    ddpm = next(r for r in resolved if r.run.experiment == "cm/cifar10_lt_ir100_ddpm")
    ev, path = next(iter(ddpm.records.items()))
    assert ddpm.done
    write_record(path, _record(1.0, "other-settings", ddpm.max_steps))  # e.g. record=<that path>
    assert not ddpm.done and "other settings" in ddpm.record_problem(ev)
    cell = _cells(collect(spec, resolved))["DDPM"]["fid"]
    assert cell.status == "partial" and 1.0 not in cell.values
    write_record(path, _record(1.0, ddpm.digests[ev], 5000))  # an evaluation of step 5000
    assert "is of step 5000, the run trains to 300000" in ddpm.record_problem(ev)
    assert _cells(collect(spec, resolved))["DDPM"]["fid"].status == "partial"


def test_the_records_name_depends_on_every_setting_that_defines_it(tmp_path: Path) -> None:
    spec = load_table(_spec())
    spec.seeds = [0]
    out = [f"paths.output_dir={tmp_path}"]

    def digest(train=(), evals=()) -> str:
        (run,) = [r for r in resolve(spec, [*out, *train], list(evals)) if r.run.seed == 0][:1]
        return next(iter(run.digests.values()))

    base = digest()
    assert digest(["train.max_steps=1000"]) != base  # a longer / shorter budget
    assert digest(evals=["eval.overall.generated=200"]) != base  # other counts
    assert digest(evals=["eval.sampler.steps=3"]) != base  # another sampler setting
    assert digest(evals=["eval.guidance=2.0"]) != base
    # Where things are and how often a run logs or saves do not define its records.
    assert digest([f"paths.data_root={tmp_path / 'elsewhere'}", "train.log_every=7"]) == base
    assert digest(["logger=csv", "train.ckpt_every=100"]) == base


def test_table_g10_samples_with_dpm_solver_in_15_steps(tmp_path: Path) -> None:
    spec = load_table_by_name("cm_table_g10")
    spec.seeds = [0]
    run = resolve(spec, [f"paths.output_dir={tmp_path}"])[0]
    (path,) = run.records.values()
    assert path.name.startswith("cm_paper-dpm_solver15-")
    ev = next(iter(run.records))
    assert "eval.sampler.group=dpm_solver" in ev.eval_overrides()
    assert "eval.sampler.steps=15" in ev.eval_overrides()


def test_analysis_columns_read_analysis_records(tmp_path: Path) -> None:
    """dominance_imba: every cell is a concept_dominance record, one per run and analysis
    settings (the pretrained row is the IMBA run at lora_scale 0), made by ltd-analyze."""
    spec = load_table_by_name("dominance_imba")
    resolved = {r.run.experiment: r for r in resolve(spec, [f"paths.output_dir={tmp_path}"])}
    imba = resolved["dominance/artbench10_ir100_imba_captions"]
    assert len(resolved) == 2 and len(imba.records) == 2  # trained once, analysed twice
    for ev, path in imba.records.items():
        assert ev.command == "analyze" and path.parent == imba.run_dir / "analyses"
        assert ev.eval_overrides()[0] == "analysis=concept_dominance"
    before = next(ev for ev in imba.records if ev.analysis_settings)
    assert before.eval_overrides() == ["analysis=concept_dominance", "analysis.lora_scale=0"]
    assert len({p.name for p in imba.records.values()}) == 2

    settings = json.loads(json.dumps(dataclasses.asdict(ConceptDominanceSettings(lora_scale=0))))
    record = {"kind": "analysis", "analysis": "concept_dominance", "settings": settings,
              "checkpoint": {"step": imba.max_steps},
              "results": {"mean_share_gap": 0.25, "frequent_dominates": {"attention": 0.75,
                          "clip": None}, "clip": {"unavailable": "no CLIP model is staged"}}}  # fmt: skip
    assert imba.stale_reason(before, record) is None
    other = {**record, "settings": {**settings, "steps": 10}}
    assert "other settings" in imba.stale_reason(before, other)
    assert metric_entry(record, "analysis.concept_dominance.mean_share_gap") == (0.25, None)
    assert metric_value(record, "analysis.concept_dominance.frequent_dominates.attention") == 0.75
    assert metric_entry(record, "analysis.concept_dominance.frequent_dominates.clip") == (
        None, "no CLIP model is staged"
    )  # fmt: skip
    assert "holds no number" in metric_entry(record, "analysis.concept_dominance.nope")[1]
    # A table of analysis cells names the analysis, not a protocol, sampler or guidance.
    result = collect(spec, list(resolved.values()))
    for text in (to_markdown(result), to_latex(result)):
        assert "the analysis " in text and "concept" in text and "docs/analyses.md" in text
        assert "Protocol" not in text and "guidance" not in text, text
    write_json(imba.records[before], record)  # results that do not validate
    assert "invalid concept_dominance record" in imba.record_problem(before)

    bad = {**_spec(), "columns": [{"key": "x", "metric": "analysis.no_such_analysis.value"}]}
    with pytest.raises(TableSpecError, match="nor an analysis path"):
        load_table(bad)


def test_the_caption_states_the_reference_the_records_compared_with(filled, tmp_path) -> None:
    spec, resolved, _ = filled
    result = collect(spec, resolved)
    assert result.references == ("the balanced training split",)
    assert "Reference: the balanced training split." in to_markdown(result)
    assert "Reference: the balanced training split." in to_latex(result)
    empty = collect(spec, resolve(spec, [f"paths.output_dir={tmp_path / 'none'}"]))
    assert "Reference: each dataset's default reference set" in to_markdown(empty)


def test_a_rows_seeds_are_composed_once_and_as_hydra_composes_each() -> None:
    """The seeds of a row are one composition and copies with the seed keys set; each equals
    the run composed on its own (run name included), and a row whose overrides set a seed key
    itself is composed, not copied."""
    from omegaconf import OmegaConf

    from lt_diffusion.tables.resolution import SeedComposer
    from lt_diffusion.tables.spec import RunRef
    from lt_diffusion.utils.config import compose_config

    spec = load_table_by_name("toy2d_methods")
    spec.seeds = [0, 1, 2]
    runs = [
        *(spec.run_ref("toy/toy2d_cbdm", s) for s in spec.seeds),
        *(spec.run_ref("toy/toy2d_oc", s, ["+method.objective.ties=reject"]) for s in spec.seeds),
        RunRef("toy/toy2d_ddpm", 0, ("imbalance.seed=7",)),  # its own imbalance seed
        RunRef("toy/toy2d_ddpm", 1, ("imbalance.seed=7",)),
    ]
    compose = SeedComposer(spec, [f"paths.output_dir={CONFIG_DIR}"], CONFIG_DIR)
    for run in runs:
        got = compose(run)
        want = compose_config("train", [*run.train_overrides(), f"paths.output_dir={CONFIG_DIR}"])
        assert OmegaConf.to_container(got) == OmegaConf.to_container(want), run.key
        assert (got.run_name, got.imbalance.seed) == (want.run_name, want.imbalance.seed)
    assert len(compose.compose.composed) == 2  # one per row (the imbalance.seed=7 runs: none)


def test_a_jobs_evaluations_are_composed_once_and_as_hydra_composes_each(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from lt_diffusion.utils.config import ComposeOnce, compose_config

    compose = ComposeOnce()
    overrides = ["eval=toy", "eval.guidance=1.5", f"data_root={tmp_path}"]
    for seed in range(3):
        values = {"checkpoint": str(tmp_path / f"s{seed}" / "last.ckpt"), "record": f"r{seed}.json"}
        got = compose("evaluate", overrides, values)
        want = compose_config("evaluate", [*overrides, *(f"{k}={v}" for k, v in values.items())])
        assert OmegaConf.to_container(got) == OmegaConf.to_container(want)
    assert len(compose.composed) == 1
    with pytest.raises(KeyError, match="not a plain value"):
        compose("evaluate", overrides, {"eval": 3})  # a group, not a value
    with pytest.raises(KeyError, match="not a plain value"):
        compose("evaluate", overrides, {"no_such_key": 3})


def test_runs_trained_together_are_composed_once_and_as_hydra_composes_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's runs differ in their seeds and run directories: one composition, copies with
    those values set, each equal to the run composed on its own. Runs whose overrides differ
    in a group (or add a key) are each composed as they are."""
    from omegaconf import OmegaConf

    from lt_diffusion.tables import job as job_module
    from lt_diffusion.tables.sweep import Job
    from lt_diffusion.utils.config import ComposeOnce

    def job(seed: int, *extra: str) -> Job:
        overrides = ["experiment=toy/toy2d_cbdm", f"seed={seed}", f"imbalance.seed={seed}"]
        overrides += [*extra, f"paths.output_dir={tmp_path}"]
        return Job(f"toy/toy2d_cbdm/seed{seed}", overrides, str(tmp_path / f"run{seed}"), 1, 1)

    made: list[ComposeOnce] = []

    def counting() -> ComposeOnce:
        made.append(ComposeOnce())
        return made[-1]

    monkeypatch.setattr(job_module, "ComposeOnce", counting)
    cases = [
        [job(s) for s in range(3)],
        [job(0, "imbalance=ir1"), job(1, "imbalance=ir100")],  # a group differs
        [job(0, "+method.objective.ties=reject"), job(1)],  # not the same overrides
    ]
    for jobs in cases:
        made.clear()
        got = job_module.train_configs(jobs, "t")
        for cfg, j in zip(got, jobs, strict=True):
            want = job_module.train_config(j, "t")
            assert OmegaConf.to_container(cfg) == OmegaConf.to_container(want), j.key
            assert (cfg.run_name, cfg.paths.run_dir) == (want.run_name, j.run_dir)
        if jobs is cases[0]:
            assert len(made) == 1 and len(made[0].composed) == 1  # composed once
