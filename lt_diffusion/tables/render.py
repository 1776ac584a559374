"""A :class:`~lt_diffusion.tables.aggregate.TableResult` as Markdown, LaTeX and CSV.

Statistics: a cell significantly better / worse than its block's baseline (paired test over
seeds, Holm-adjusted over the table) carries ▲ / ▼ (LaTeX: a superscript triangle, amssymb);
the caption states the test, the baseline, the smallest detectable difference per column and
where the best mean is not distinguishable from the second. The ``diff`` view shows each row's
paired difference to the baseline ± the half-width of its 95% interval instead of its values.

A cell reads ``ours (published, ours - published)``: ``7.81 ± 0.10 (7.73, +0.08)``, with the
standard deviation only when there are several seeds, and ``[1/2 seeds; seed 1 failed: <log>]``
when some seeds have no record. Best **bold** and second best underlined as in the papers, among
the cells that have every seed only (a mean over part of the seeds is not comparable). Cells
without numbers say why: ``pending``, ``failed: seed <s>: <log>``, ``n/a: <reason>``,
``missing: <reason>``, ``invalid record``. Every form names the overrides the table was run with.

The LaTeX is a complete ``table`` float (booktabs) to paste into a paper: a caption with the
protocol, sampler, guidance, seeds and how to read a cell, ``tex:`` labels where the spec gives
them, an arrow after each column label, and cells without numbers as short italic marks whose
reasons are notes under the table.
"""

from __future__ import annotations

import csv
import io
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from lt_diffusion.tables.aggregate import Cell, TableResult
from lt_diffusion.tables.spec import Block, Column, Row, sampler_text
from lt_diffusion.tables.statistics import PERMUTATION_MIN_PAIRS
from lt_diffusion.utils.io import atomic_write_text


def _num(v: float | None, digits: int, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _short(text: str, limit: int = 60) -> str:
    """A reason shortened for a Markdown cell (the CSV and the LaTeX notes keep all of it): its
    first clause, without parentheses, cut at a word."""
    short = text.split("; ")[0].split(": ")[0].strip()
    if len(short) > limit:
        short = re.sub(r"\s*\([^)]*\)", "", short)
    if len(short) > limit:
        short = short.split(", ")[0]
    if len(short) > limit:
        short = short[:limit].rsplit(" ", 1)[0] + "…"
    return short


def _seeds_text(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def _approx(v: float, digits: int) -> str:
    """A positive size at the column's digits, or two significant digits when smaller."""
    return f"{v:.{digits}f}" if v >= 10**-digits else f"{v:.2g}"


def _has_published(result: TableResult) -> bool:
    return any(
        v is not None for b in result.spec.blocks for r in b.rows for v in r.published.values()
    )


_TEST_NAME = {
    "t": "a paired t-test",
    "permutation": "an exact sign-flip permutation test of the mean paired difference",
}


class _Style(NamedTuple):
    """How the caption's statistics sentences are written in one format."""

    code: Callable[[str], str]  # a row label or config key
    text: Callable[[str], str]  # plain text (a column or block label)
    marks: tuple[str, str]  # better, worse
    alpha: str
    geq: str


_MD = _Style(lambda t: f"`{t}`", lambda t: t, ("▲", "▼"), "α", "≥")


def _baselines_text(result: TableResult, style: _Style) -> str:
    labels = [(b.label, b.baseline) for b in result.spec.blocks]
    if len({base for _, base in labels}) == 1:
        return style.code(labels[0][1])
    return "; ".join(f"{style.text(block)}: {style.code(base)}" for block, base in labels)


def _statistics_text(result: TableResult, style: _Style) -> str:
    """The caption's sentences on the statistics: the test behind the marks, the smallest
    detectable differences, where the best is not distinguishable from the second, and what
    the seeds varied."""
    spec, stats = result.spec, result.statistics
    seeds = (
        f"Seeds vary the training and {', '.join(style.code(k) for k in spec.vary)}."
        if spec.vary
        else "Seeds vary the training only (data subset and evaluation seed fixed)."
    )
    noise = ""
    if stats is not None and stats.eval_noise:
        cols = {c.key: c for c in result.columns}
        noise = (
            " Evaluation noise (std of one evaluation over its generation sets, eval.repeats; mean over the records that measured it): "
            + ", ".join(
                f"{style.text(cols[k].label)} {_approx(v, cols[k].digits)}"
                for k, v in stats.eval_noise.items()
            )
            + "."
        )
    seeds += noise
    if not result.testable or stats is None:
        return f"One seed: no test is possible (no marks, no p-values). {seeds}"
    if stats.comparisons == 0:
        return f"No row pairs with its baseline over two seeds or more yet: no marks. {seeds}"
    cols = {c.key: c for c in result.columns}
    level = f"{style.alpha} = {stats.alpha:g}"
    text = (
        f"{style.marks[0]} / {style.marks[1]}: better / worse than the block's baseline "
        f"({_baselines_text(result, style)}) by {_TEST_NAME[stats.test]} over the seeds both "
        "rows have (same seed: same data subset and seeded streams), its p Holm-adjusted over "
        f"the table's {stats.comparisons} comparisons, {level}; no mark: no difference shown "
        "at that level."
    )
    if stats.test == "t" and len(spec.seeds) >= PERMUTATION_MIN_PAIRS:
        text += " The CSV also holds the exact sign-flip permutation p."
    mde = [
        f"{style.text(cols[k].label)} {_approx(v, cols[k].digits)}"
        for k, v in stats.detectable.items()
        if v is not None
    ]
    if mde:
        text += (
            f" Smallest difference {len(spec.seeds)} seeds detect with {stats.power:.0%} power "
            f"at {level} / {stats.comparisons} (paired t, pooled paired spread): "
            f"{', '.join(mde)}."
        )
    if stats.indistinct:
        where = ", ".join(
            style.text(f"{cols[key].label} ({block})" if block else cols[key].label)
            for block, key in stats.indistinct
        )
        text += (
            f" Best not distinguishable from second best (paired, unadjusted p {style.geq} "
            f"{stats.alpha:g}): {where}."
        )
    return f"{text} {seeds}"


def _is_baseline(result: TableResult, block: Block, row: Row) -> bool:
    """Whether to name ``row`` its block's baseline: where something is compared with it."""
    return row.label == block.baseline and (result.testable or result.spec.view == "diff")


def _diff_text(cell: Cell, col: Column, plus_minus: str) -> str | None:
    """A non-baseline cell of the diff view: ``+0.012 ± 0.008`` (half-width of the 95% CI),
    ``[2 pairs]`` when fewer seeds pair than the table has; None when nothing pairs."""
    d = cell.paired
    if d is None or d.diff is None:
        return None
    text = _num(d.diff, col.digits, signed=True)
    if d.half_width is not None:
        text += f"{plus_minus}{_num(d.half_width, col.digits)}"
    if d.n < cell.n_expected:
        text += f" [{d.n} pair{'s' if d.n > 1 else ''}]"
    return text


def _sampler_text(result: TableResult) -> str:
    """What the records sampled with (``ddim50``), else the spec's choice."""
    return ", ".join(result.samplers) or sampler_text(result.spec.sampler)


def _guidance_text(result: TableResult, tex: bool = False) -> str:
    """The classifier-free guidance weight(s) of the records: ``w=1.5``."""
    g = [f"{w:g}" for w in result.guidance]
    if not g:
        return "as each run's config sets it (no record yet)"
    if len(g) == 1:
        return f"$w={g[0]}$" if tex else f"w={g[0]}"
    many = ", ".join(g)
    return (rf"$w \in \{{{many}\}}$" if tex else f"w ∈ {{{many}}}") + " (per row)"


def _protocol_text(result: TableResult, code: Callable[[str], str], tex: bool) -> str:
    """How the cells were evaluated: the protocol, sampler and guidance of generation records;
    the test split for classification tables (whose records sample nothing)."""
    if result.spec.task == "classify":
        return "Each dataset's test split, top-1 predictions, in " + ("\\%." if tex else "%.")
    return (
        f"Protocol {code(result.spec.eval)}, sampler {code(_sampler_text(result))}, guidance "
        f"{_guidance_text(result, tex=tex)}. {_reference_text(result, tex)}"
    )


def _reference_text(result: TableResult, tex: bool) -> str:
    """The real images (or statistics file) the records compared with."""
    refs = result.references or (
        "each dataset's default reference set (the full, balanced training split for a long "
        "tail made by a profile; docs/evaluation.md)",
    )
    text = "; ".join(refs)
    return f"Reference: {_tex_escape(text) if tex else text}."


# Markdown


def _md_seeds(cell: Cell) -> str:
    """``[2/3 seeds; seed 2 failed: <log>]`` after a partial cell."""
    if cell.status != "partial":
        return ""
    parts = [f"{len(cell.values)}/{cell.n_expected} seeds"]
    parts += [f"seed {s} failed: {log}" for s, log in cell.failed.items()]
    if cell.note:
        parts.append(_short(cell.note))
    return " [" + "; ".join(parts) + "]"


def _md_empty(cell: Cell, digits: int) -> str:
    pub = "" if cell.published is None else f" (paper {_num(cell.published, digits)})"
    text = {
        "failed": f"failed: {cell.log}",
        "unavailable": f"n/a: {_short(cell.note or '')}",
        "missing": f"missing: {cell.note}",
        "invalid": "invalid record",
        # a record exists but was made under other settings (or of an unfinished run)
        "pending": "pending" + (f": {_short(cell.note)}" if cell.note else ""),
    }.get(cell.status, cell.status)
    return text + pub


MD_MARKS = {"better": "▲", "worse": "▼"}
TEX_MARKS = {
    "better": r"\textsuperscript{\ensuremath{\blacktriangle}}",
    "worse": r"\textsuperscript{\ensuremath{\blacktriangledown}}",
}


def _marked(cell: Cell, col: Column, plus_minus: str, marks: tuple[str, str]) -> str:
    """``mean ± std``, best / second best marked by ``marks`` (format strings)."""
    ours = _num(cell.mean, col.digits)
    if cell.std is not None:
        ours += f"{plus_minus}{_num(cell.std, col.digits)}"
    return marks[cell.rank - 1].format(ours) if cell.rank in (1, 2) else ours


def _md_cell(cell: Cell, col: Column, view: str = "values") -> str:
    if cell.mean is None:
        return _md_empty(cell, col.digits)
    mark = f" {MD_MARKS[cell.mark]}" if cell.mark else ""
    if view == "diff" and not cell.baseline:
        return (_diff_text(cell, col, " ± ") or "no pairs") + mark
    ours = _marked(cell, col, " ± ", ("**{}**", "<u>{}</u>")) + mark
    if cell.published is not None and view == "values":
        ours += f" ({_num(cell.published, col.digits)}, {_num(cell.diff, col.digits, True)})"
    return ours + _md_seeds(cell)


def to_markdown(result: TableResult) -> str:
    spec = result.spec
    cols = result.columns
    if spec.view == "diff":
        cells_text = (
            f"Each row minus its block's baseline (the baseline row: mean ± std) over seeds "
            f"{_seeds_text(spec.seeds)}, paired by seed, ± the half-width of its 95% confidence "
            "interval (`[k pairs]`: the seeds both rows have); **best** and <u>second best</u> "
            "mean per block among the cells with every seed."
        )
    else:
        cells_text = (
            f"Ours: mean ± std over seeds {_seeds_text(spec.seeds)}"
            + ("; in parentheses the published value and ours minus it" if _has_published(result)
               else "")
            + "; **best** and <u>second best</u> mean per block among the cells with every seed "
            "(`[k/n seeds]`: the mean of the k seeds that have a record)."
        )  # fmt: skip
    lines = [
        f"### {spec.title}",
        "",
        f"{cells_text} {_statistics_text(result, _MD)} "
        f"{_protocol_text(result, lambda t: f'`{t}`', False)}"
        + (f" Source: {spec.source}." if spec.source else ""),
    ]
    if spec.requires:
        runs = ", ".join(f"`{e}`" for e in spec.requires)
        lines[-1] += f" Trained first, the runs the rows start from: {runs}."
    if result.train_overrides or result.eval_overrides:
        lines += [
            "",
            "**Run with overrides** (the cells were made with these, whatever the labels say): "
            + "; ".join(
                f"{kind} " + " ".join(f"`{o}`" for o in overrides)
                for kind, overrides in (
                    ("train", result.train_overrides),
                    ("eval", result.eval_overrides),
                )
                if overrides
            ),
        ]
    lines += [
        "",
        "| | " + " | ".join(c.label for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for block, rows in result.blocks:
        if block.label:
            lines.append(f"| *{block.label}* |" + " |" * len(cols))
        for row, cells in rows:
            label = row.label + (" (baseline)" if _is_baseline(result, block, row) else "")
            lines.append(
                f"| {label} | "
                + " | ".join(_md_cell(cells[c.key], c, spec.view) for c in cols)
                + " |"
            )
    return "\n".join(lines) + "\n"


# LaTeX

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_ARROW = {"lower": r"$\downarrow$", "higher": r"$\uparrow$"}


def _tex_escape(text: str) -> str:
    """Plain text as LaTeX text (one pass, so that no replacement is escaped again)."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


def _tex_label(label: str, tex: str | None) -> str:
    return tex if tex is not None else _tex_escape(label)


def _tt(text: str) -> str:
    return rf"\texttt{{{_tex_escape(text)}}}"


class _Notes:
    """Footnote-style notes under the table: each distinct text once, marked a, b, c, ..."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        i = self.texts.index(text)
        letters = ""
        while True:  # a .. z, then aa, ab, ...
            letters = chr(ord("a") + i % 26) + letters
            i = i // 26 - 1
            if i < 0:
                return rf"$^{{\mathrm{{{letters}}}}}$"


def _tex_failed(cell: Cell) -> str:
    return "; ".join(f"seed {s} failed, log {_tt(log)}" for s, log in cell.failed.items())


def _tex_cell(cell: Cell, col: Column, notes: _Notes, view: str = "values") -> str:
    pub = (
        "" if cell.published is None else rf" {{\scriptsize ({_num(cell.published, col.digits)})}}"
    )
    if cell.mean is None:
        why = {
            "failed": _tex_failed(cell),
            "unavailable": f"{_tex_escape(col.label)} not available: {_tex_escape(cell.note or '')}",
            "missing": f"not run here: {_tex_escape(cell.note or '')}",
            "invalid": f"invalid record: {_tex_escape(cell.note or '')}",
            "pending": cell.note and _tex_escape(cell.note),
        }.get(cell.status)
        mark = {"unavailable": "n/a"}.get(cell.status, cell.status)
        return rf"\emph{{{mark}}}" + (notes.mark(why) if why else "") + pub
    mark = TEX_MARKS[cell.mark] if cell.mark else ""
    if view == "diff" and not cell.baseline:
        diff = _diff_text(cell, col, r"$\pm$")
        return (diff.replace("[", "{\\scriptsize [").replace("]", "]}") if diff else
                r"\emph{no pairs}") + mark  # fmt: skip
    ours = _marked(cell, col, r"$\pm$", (r"\textbf{{{}}}", r"\underline{{{}}}")) + mark
    ours += pub if view == "values" else ""
    if cell.status == "partial":
        ours += rf" {{\scriptsize [{len(cell.values)}/{cell.n_expected} seeds]}}"
        why = "; ".join(filter(None, [_tex_failed(cell), cell.note and _tex_escape(cell.note)]))
        if why:
            ours += notes.mark(why)
    return ours


def _tex_caption(result: TableResult) -> str:
    spec = result.spec
    seeds = _seeds_text(spec.seeds)
    if spec.view == "diff":
        cells = (
            f"Each row minus its block's baseline (the baseline row: mean $\\pm$ std) over seeds "
            f"{seeds}, paired by seed, $\\pm$ the half-width of its 95\\% confidence interval "
            r"([$k$ pairs]: the seeds both rows have)."
        )
    else:
        cells = f"Ours: mean $\\pm$ std over seeds {seeds}" + (
            ", in parentheses the published value" if _has_published(result) else ""
        )
        cells += r"; [$k$/$n$ seeds]: the mean of the $k$ seeds that have a record."
    style = _Style(
        _tt, _tex_escape, (TEX_MARKS["better"], TEX_MARKS["worse"]), r"$\alpha$", r"$\geq$"
    )
    stats = _statistics_text(result, style).replace("% power", r"\% power")
    text = (
        f"{_tex_escape(spec.title)}. {cells} \\textbf{{Bold}}: best, \\underline{{underlined}}: "
        r"second best mean per block, among the cells with every seed. \emph{pending}: no "
        f"record yet. {stats} {_protocol_text(result, _tt, True)}"
    )
    if spec.source:
        text += f" Source: {_tex_escape(spec.source)}."
    if spec.requires:
        text += " Trained first, the runs the rows start from: "
        text += ", ".join(_tt(e) for e in spec.requires) + "."
    runs = [
        f"{kind} " + ", ".join(_tt(o) for o in overrides)
        for kind, overrides in (("train", result.train_overrides), ("eval", result.eval_overrides))
        if overrides
    ]
    if runs:
        text += " Run with overrides: " + "; ".join(runs) + "."
    return text


def to_latex(result: TableResult) -> str:
    """A ``table`` float (needs ``\\usepackage{booktabs,amssymb}``), labelled
    ``tab:<table name>``."""
    spec = result.spec
    cols = result.columns
    notes = _Notes()
    body = [
        "Method & "
        + " & ".join(_tex_label(c.label, c.tex) + _ARROW[c.better] for c in cols)
        + r" \\",
        r"\midrule",
    ]
    for i, (block, rows) in enumerate(result.blocks):
        if i:
            body.append(r"\midrule")
        if block.label or block.tex:
            label = _tex_label(block.label, block.tex)
            body.append(rf"\multicolumn{{{len(cols) + 1}}}{{l}}{{\emph{{{label}}}}} \\")
        for row, cells in rows:
            label = _tex_label(row.label, row.tex)
            if _is_baseline(result, block, row):
                label += r" {\scriptsize (baseline)}"
            body.append(
                label
                + " & "
                + " & ".join(_tex_cell(cells[c.key], c, notes, spec.view) for c in cols)
                + r" \\"
            )
    lines = [
        f"% {_tex_escape(spec.title)}: generated by lt_diffusion.table from its records.",
        r"% Needs \usepackage{booktabs,amssymb} in the preamble (too wide for a column: wrap the tabular",
        r"% in \resizebox{\linewidth}{!}{...} from graphicx, or use table*).",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption[{{{_tex_escape(spec.title)}}}]{{{_tex_caption(result)}}}",
        rf"\label{{tab:{spec.name}}}",
        r"\begin{tabular}{l" + "c" * len(cols) + "}",
        r"\toprule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
    ]
    if notes.texts:
        lines += [r"\par\smallskip", r"{\footnotesize\raggedright"]
        lines += [f"{notes.mark(t)}\\,{t.rstrip('.')}.\\par" for t in notes.texts]
        lines.append("}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# CSV

CSV_FIELDS = ("table", "block", "row", "column", "metric", "mean", "std", "n", "seeds",
              "published", "published_diff", "status", "rank", "baseline", "diff", "ci_low",
              "ci_high", "n_pairs", "test", "p", "p_permutation", "p_adj", "mark", "log", "note",
              "train_overrides", "eval_overrides")  # fmt: skip


def to_csv(result: TableResult) -> str:
    """One line per cell; the overrides in shell form (``shlex.split`` gives them back).
    ``published_diff`` is ours minus the published value; ``diff`` .. ``mark`` compare the
    row with its block's ``baseline`` row (paired by seed; empty in the baseline row)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    train, evals = shlex.join(result.train_overrides), shlex.join(result.eval_overrides)
    test = result.statistics.test if result.statistics else result.spec.test
    for block, rows in result.blocks:
        for row, cells in rows:
            for col in result.columns:
                c = cells[col.key]
                d = c.paired
                writer.writerow({
                    "table": result.spec.name, "block": block.label, "row": row.label,
                    "column": col.key, "metric": col.metric, "mean": c.mean, "std": c.std,
                    "n": len(c.values), "seeds": c.n_expected, "published": c.published,
                    "published_diff": c.diff, "status": c.status, "rank": c.rank,
                    "baseline": block.baseline,
                    "diff": d and d.diff, "ci_low": d and d.ci_low, "ci_high": d and d.ci_high,
                    "n_pairs": d and d.n, "test": test, "p": d and d.p(test),
                    "p_permutation": d and d.p_permutation, "p_adj": c.p_adj, "mark": c.mark,
                    "log": c.log, "note": c.note, "train_overrides": train,
                    "eval_overrides": evals,
                })  # fmt: skip
    return buf.getvalue()


def write_table(result: TableResult, out_dir: Path) -> dict[str, Path]:
    """``<out_dir>/<table>.md``, ``.tex`` and ``.csv``, each written atomically; the diff
    view's Markdown and LaTeX as ``<table>.diff.md`` / ``.diff.tex`` (the CSV holds both)."""
    out_dir = Path(out_dir)
    name = result.spec.name
    view = "" if result.spec.view == "values" else f".{result.spec.view}"
    return {
        "md": atomic_write_text(out_dir / f"{name}{view}.md", to_markdown(result)),
        "tex": atomic_write_text(out_dir / f"{name}{view}.tex", to_latex(result)),
        "csv": atomic_write_text(out_dir / f"{name}.csv", to_csv(result)),
    }
