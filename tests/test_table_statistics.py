"""The statistics behind a table's marks, each against an independent computation (scipy's
ttest_rel, a float64 interval by hand, brute-force sign flips, Holm by hand, a Monte Carlo
power), and tables of hand-made records with known effects and a known null effect."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lt_diffusion.records.base import write_record
from lt_diffusion.tables import (
    TableSpecError,
    collect,
    load_table,
    resolve,
    to_csv,
    to_latex,
    to_markdown,
    write_table,
)
from lt_diffusion.tables.statistics import (
    detectable_difference,
    holm,
    paired_difference,
    pooled_sd,
    sign_flip_p,
)
from tests.test_tables import _compile, _record, _tex_balanced


def test_the_paired_difference_is_scipys_paired_t_with_a_float64_interval() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(10, 1, size=5)
    row = base - 0.7 + rng.normal(0, 0.3, size=5)
    got = paired_difference(dict(enumerate(row)), dict(enumerate(base)))
    assert got.p_t == pytest.approx(stats.ttest_rel(row, base).pvalue, rel=1e-12)
    d = np.asarray(row, dtype=np.float64) - base
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert (got.n, got.diff, got.sd) == (5, pytest.approx(d.mean()), pytest.approx(d.std(ddof=1)))
    assert (got.ci_low, got.ci_high) == (
        pytest.approx(d.mean() - half, rel=1e-10),
        pytest.approx(d.mean() + half, rel=1e-10),
    )
    assert got.half_width == pytest.approx(half) and got.p_permutation is None  # 5 < 8 pairs


def test_pairs_are_the_seeds_both_rows_have() -> None:
    got = paired_difference({0: 1.0, 1: 2.0, 3: 9.0}, {0: 0.5, 1: 1.0, 2: 7.0})
    assert got.n == 2 and got.diff == pytest.approx(0.75)
    one = paired_difference({0: 1.0}, {0: 0.5, 1: 1.0})
    assert (one.n, one.diff, one.p_t, one.ci_low) == (1, 0.5, None, None)  # no test on one pair
    assert paired_difference({1: 1.0}, {0: 1.0}).n == 0
    # Every seed moved by the same amount: no spread, the difference is certain.
    same = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert (same.sd, same.ci_low, same.ci_high, same.p_t) == (0.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("n", [8, 9])
def test_the_sign_flip_test_is_the_enumeration_of_every_flip(n: int) -> None:
    d = np.random.default_rng(n).normal(0.4, 1.0, size=n)
    flips = np.array(list(itertools.product([1.0, -1.0], repeat=n)))
    means = (flips * d).mean(axis=1)
    brute = np.mean(np.abs(means) >= abs(d.mean()) - 1e-12)
    assert sign_flip_p(d) == pytest.approx(brute, abs=1e-12)
    got = paired_difference(dict(enumerate(d)), dict.fromkeys(range(n), 0.0))
    assert got.p_permutation == pytest.approx(brute, abs=1e-12)


def test_holm_on_a_hand_worked_example() -> None:
    # m = 4; sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    # (never below the step before), back in the input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_pooled_sd_weights_each_comparison_by_its_degrees_of_freedom() -> None:
    a = paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, dict.fromkeys(range(3), 0.0))
    b = paired_difference({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})
    want = math.sqrt((2 * np.var([1, 2, 4], ddof=1) + 1 * np.var([1, 3], ddof=1)) / 3)
    assert pooled_sd([a, b]) == pytest.approx(want)
    assert pooled_sd([paired_difference({0: 1.0}, {0: 0.0})]) is None


@pytest.mark.parametrize(("n", "alpha"), [(3, 0.05), (10, 0.05 / 20)])
def test_the_detectable_difference_has_80_percent_power(n: int, alpha: float) -> None:
    """A simulated paired t-test at the detectable difference rejects 80% of the time."""
    sd = 0.3
    effect = detectable_difference(sd, n, alpha)
    rng = np.random.default_rng(0)
    d = rng.normal(effect, sd, size=(40_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1))
    assert power == pytest.approx(0.8, abs=0.01)
    # Many pairs: the normal approximation (z_{1-a/2} + z_{0.8}) sd / sqrt(n).
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert detectable_difference(sd, 400) == pytest.approx(z * sd / 20, rel=0.01)
    assert detectable_difference(sd, 1) is None


# A table of hand-made records: 8 seeds, a baseline with seed-to-seed spread shared by every
# row (same seed, same subset), a row 3 FID lower (a known effect), one 2 higher (worse), one
# that differs only by noise (a known null effect). Resolved once (composing is the slow part).
SEEDS = list(range(8))
ROWS = {
    "DDPM": "toy/toy2d_ddpm",
    "CBDM": "toy/toy2d_cbdm",
    "OC": "toy/toy2d_oc",
    "RS": "toy/toy2d_rs",
}


def _spec(seeds=SEEDS, **extra) -> dict:
    return {
        "name": "stats",
        "title": "Statistics",
        "seeds": seeds,
        "eval": "toy",
        "columns": [
            {"key": "fid", "label": "FID", "metric": "overall.fid", "better": "lower"},
            {"key": "recall", "label": "Recall", "metric": "overall.recall", "better": "higher"},
        ],
        "blocks": [
            {"label": "IR=100", "rows": [{"label": k, "experiment": v} for k, v in ROWS.items()]}
        ],  # fmt: skip
        **extra,
    }


def _values(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    base = 20 + rng.normal(0, 2.0, size=n)  # seed-to-seed spread, shared
    return {
        "DDPM": base,
        "CBDM": base - 3 + rng.normal(0, 0.3, size=n),  # better
        "OC": base + 2 + rng.normal(0, 0.3, size=n),  # worse
        "RS": base + rng.normal(0, 0.3, size=n),  # no effect
    }


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The spec resolved under a temporary folder, every record written; the values."""
    out = tmp_path_factory.mktemp("stats")
    spec = load_table(_spec())
    resolved = resolve(spec, [f"paths.output_dir={out}"])
    label = {v: k for k, v in ROWS.items()}
    values = _values(len(SEEDS))
    for r in resolved:
        v = float(values[label[r.run.experiment]][r.run.seed])
        for ev, path in r.records.items():
            record = _record(v, r.digests[ev], r.max_steps)
            record["metrics"]["overall"]["recall"] = 1 - v / 100  # lower FID, higher recall
            record["metrics"]["overall"]["fid_std"] = 0.25  # as eval.repeats writes it
            write_record(path, record)
    return spec, resolved, values


def _with(table, seeds=SEEDS, drop=frozenset(), **changes):
    """The table's spec with ``changes`` and only ``seeds``; the records of ``drop`` (row,
    seed) missing; the values of those seeds."""
    spec, resolved, values = table
    spec = dataclasses.replace(copy.deepcopy(spec), seeds=list(seeds), **changes)
    label = {v: k for k, v in ROWS.items()}
    kept = []
    for r in resolved:
        if r.run.seed not in seeds:
            continue
        if (label[r.run.experiment], r.run.seed) in drop:
            r = dataclasses.replace(
                r, records={ev: p.with_name("none.json") for ev, p in r.records.items()}
            )
        kept.append(r)
    return spec, kept, {k: v[list(seeds)] for k, v in values.items()}


def _cells(result) -> dict:
    ((_, rows),) = result.blocks
    return {row.label: c for row, c in rows}


def test_a_known_effect_and_a_known_null_effect_are_marked_correctly(table, tmp_path) -> None:
    spec, resolved, values = _with(table)
    result = collect(spec, resolved)
    cells = _cells(result)
    assert [cells[r]["fid"].mark for r in ROWS] == [None, "better", "worse", None]
    assert [cells[r]["recall"].mark for r in ROWS] == [None, "better", "worse", None]
    assert cells["DDPM"]["fid"].baseline and cells["DDPM"]["fid"].paired is None
    # The adjusted p-values are Holm's over the table's 6 comparisons of scipy's paired t.
    raw = {
        (row, col): stats.ttest_rel(
            values[row] if col == "fid" else 1 - values[row] / 100,
            values["DDPM"] if col == "fid" else 1 - values["DDPM"] / 100,
        ).pvalue
        for row in ("CBDM", "OC", "RS")
        for col in ("fid", "recall")
    }
    want = dict(zip(raw, holm(list(raw.values()))))
    for (row, col), p_adj in want.items():
        assert cells[row][col].p_adj == pytest.approx(p_adj, rel=1e-9)
    assert result.statistics.comparisons == 6
    md = to_markdown(result)
    assert "| DDPM (baseline) |" in md and " ▲" in md and " ▼" in md
    assert "Holm-adjusted over the table's 6 comparisons" in md
    assert "Smallest difference 8 seeds detect with 80% power" in md
    assert result.statistics.eval_noise == {"fid": pytest.approx(0.25)}
    assert "Evaluation noise (std of one evaluation over its generation sets" in md
    assert "mean over the records that measured it): FID 0.25." in md
    tex = to_latex(result)
    assert r"\textsuperscript{\ensuremath{\blacktriangle}}" in tex and "amssymb" in tex
    _compile(tmp_path, tex)
    rows = list(csv.DictReader(io.StringIO(to_csv(result))))
    rs = next(r for r in rows if (r["row"], r["column"]) == ("RS", "fid"))
    d = values["RS"] - values["DDPM"]
    ci = stats.ttest_rel(values["RS"], values["DDPM"]).confidence_interval()
    assert float(rs["diff"]) == pytest.approx(d.mean())
    assert (float(rs["ci_low"]), float(rs["ci_high"])) == (
        pytest.approx(ci.low),
        pytest.approx(ci.high),
    )
    assert (rs["n_pairs"], rs["mark"], rs["baseline"], rs["test"]) == ("8", "", "DDPM", "t")
    assert float(rs["p_adj"]) == pytest.approx(want[("RS", "fid")])
    assert float(rs["p_permutation"]) == pytest.approx(sign_flip_p(d))


def test_the_diff_view_shows_differences_and_their_interval_half_widths(table, tmp_path) -> None:
    spec, resolved, values = _with(table, view="diff")
    result = collect(spec, resolved)
    md = to_markdown(result)
    d = values["CBDM"] - values["DDPM"]
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert f"| CBDM | {d.mean():+.2f} ± {half:.2f} ▲ |" in md
    base = values["DDPM"]
    assert f"| DDPM (baseline) | {base.mean():.2f} ± {base.std(ddof=1):.2f}" in md
    paths = write_table(result, tmp_path / "tables")
    assert {p.name for p in paths.values()} == {"stats.diff.md", "stats.diff.tex", "stats.csv"}
    _tex_balanced(paths["tex"].read_text())
    _compile(tmp_path, paths["tex"].read_text())  # marks, intervals and caption compile


def test_missing_seeds_pair_over_the_seeds_both_rows_have(table) -> None:
    drop = {("CBDM", 4), ("CBDM", 5), ("CBDM", 6), ("CBDM", 7), ("DDPM", 0)}
    spec, resolved, _ = _with(table, drop=drop)
    result = collect(spec, resolved)
    cbdm = _cells(result)["CBDM"]["fid"]
    assert cbdm.status == "partial" and cbdm.paired.n == 3  # seeds 1, 2, 3
    spec.view = "diff"
    assert "[3 pairs]" in to_markdown(result)


def test_one_seed_says_no_test_is_possible(table) -> None:
    spec, resolved, _ = _with(table, seeds=[0])
    result = collect(spec, resolved)
    assert all(c.mark is None and c.p_adj is None for c in _cells(result)["CBDM"].values())
    md = to_markdown(result)
    assert "One seed: no test is possible (no marks, no p-values)." in md
    assert "▲" not in md and "(baseline)" not in md
    assert "in parentheses the published value" not in md  # the spec publishes nothing
    row = next(r for r in csv.DictReader(io.StringIO(to_csv(result))) if r["row"] == "CBDM")
    assert (row["n_pairs"], row["p"], row["p_adj"]) == ("1", "", "")


def test_the_permutation_test_can_drive_the_marks(table) -> None:
    spec, resolved, _ = _with(table, test="permutation")
    result = collect(spec, resolved)
    cbdm = _cells(result)["CBDM"]["fid"]
    # 8 differences of one sign: the observed mean is an extreme of the 2^8 flips, p = 2 / 256.
    assert cbdm.paired.p_permutation == pytest.approx(2 / 256)
    assert cbdm.p_adj == pytest.approx(
        holm(
            [
                c.paired.p_permutation
                for row in ("CBDM", "OC", "RS")
                for c in _cells(result)[row].values()
            ]
        )[0]
    )
    assert cbdm.mark == "better" and "exact sign-flip permutation test" in to_markdown(result)
    with pytest.raises(TableSpecError, match="at least 8 seeds"):
        load_table(_spec(seeds=[0, 1, 2], test="permutation"))


def test_a_baseline_can_be_named(table) -> None:
    spec, resolved, _ = _with(table)
    spec.blocks[0].baseline = "RS"
    cells = _cells(collect(spec, resolved))
    assert cells["RS"]["fid"].baseline and cells["DDPM"]["fid"].paired.n == 8
    assert cells["CBDM"]["fid"].mark == "better" and cells["DDPM"]["fid"].mark is None


def test_bad_statistics_settings_are_refused_with_the_fix(tmp_path: Path) -> None:
    raw = _spec(seeds=[0])
    raw["blocks"][0]["baseline"] = "DDPN"
    with pytest.raises(TableSpecError, match=r"baseline 'DDPN' names no row.*'DDPM'"):
        load_table(raw)
    with pytest.raises(TableSpecError, match=r"'sideways' is not one of \('values', 'diff'\)"):
        load_table(_spec(view="sideways"))
    with pytest.raises(TableSpecError, match="test"):
        load_table(_spec(test="z"))
    spec = load_table(_spec(seeds=[0], vary=["imbalance.sed"]))
    with pytest.raises(TableSpecError, match=r"'imbalance.sed'.*did you mean imbalance.seed"):
        resolve(spec, [f"paths.output_dir={tmp_path}"])
    spec = load_table(_spec(seeds=[0], vary=["eval.sead"]))
    with pytest.raises(TableSpecError, match=r"'eval.sead' is not a key of the evaluation"):
        resolve(spec, [f"paths.output_dir={tmp_path}"])


def test_varied_keys_take_the_seed(tmp_path: Path) -> None:
    """``vary: [imbalance.seed, eval.seed]``: seed s draws subset s (its own run directory) and
    evaluates with eval.seed s; seed 0 is the papers' subset, the same run as without vary."""

    def one_row(**extra) -> dict:
        raw = _spec(seeds=[0, 1], **extra)
        raw["blocks"][0]["rows"] = raw["blocks"][0]["rows"][:1]
        return raw

    plain = resolve(load_table(one_row()), [f"paths.output_dir={tmp_path}"])
    varied = resolve(
        load_table(one_row(vary=["imbalance.seed", "eval.seed"])),
        [f"paths.output_dir={tmp_path}"],
    )
    dirs = {(r.run.experiment, r.run.seed): r for r in varied}
    ddpm0, ddpm1 = dirs[("toy/toy2d_ddpm", 0)], dirs[("toy/toy2d_ddpm", 1)]
    assert ddpm1.run_dir.name == "toy2d-ir100-subset1-ddpm-seed1"
    assert int(ddpm1.config.data.subset_seed) == 1
    plain0 = next(r for r in plain if (r.run.experiment, r.run.seed) == ("toy/toy2d_ddpm", 0))
    assert ddpm0.run_dir == plain0.run_dir == tmp_path / "runs" / "toy2d-ir100-ddpm-seed0"
    (ev1,) = ddpm1.records
    assert "eval.seed=1" in ev1.eval_overrides()
    plain1 = next(r for r in plain if (r.run.experiment, r.run.seed) == ("toy/toy2d_ddpm", 1))
    assert set(ddpm1.digests.values()).isdisjoint(plain1.digests.values())
    md = to_markdown(collect(load_table(one_row(vary=["imbalance.seed"])), varied))
    assert "Seeds vary the training and `imbalance.seed`." in md
