"""A :class:`~lt_diffusion.tables.aggregate.TableResult` as Markdown, LaTeX and CSV.

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

from lt_diffusion.tables.aggregate import Cell, TableResult
from lt_diffusion.tables.spec import Column, sampler_text
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


def _marked(cell: Cell, col: Column, plus_minus: str, marks: tuple[str, str]) -> str:
    """``mean ± std``, best / second best marked by ``marks`` (format strings)."""
    ours = _num(cell.mean, col.digits)
    if cell.std is not None:
        ours += f"{plus_minus}{_num(cell.std, col.digits)}"
    return marks[cell.rank - 1].format(ours) if cell.rank in (1, 2) else ours


def _md_cell(cell: Cell, col: Column) -> str:
    if cell.mean is None:
        return _md_empty(cell, col.digits)
    ours = _marked(cell, col, " ± ", ("**{}**", "<u>{}</u>"))
    if cell.published is not None:
        ours += f" ({_num(cell.published, col.digits)}, {_num(cell.diff, col.digits, True)})"
    return ours + _md_seeds(cell)


def to_markdown(result: TableResult) -> str:
    spec = result.spec
    cols = result.columns
    lines = [
        f"### {spec.title}",
        "",
        f"Ours: mean ± std over seeds {_seeds_text(spec.seeds)}; in parentheses the published "
        "value and ours minus it; **best** and <u>second best</u> per block among the cells "
        "with every seed (`[k/n seeds]`: the mean of the k seeds that have a record). "
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
            lines.append(
                f"| {row.label} | " + " | ".join(_md_cell(cells[c.key], c) for c in cols) + " |"
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


def _tex_cell(cell: Cell, col: Column, notes: _Notes) -> str:
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
    ours = _marked(cell, col, r"$\pm$", (r"\textbf{{{}}}", r"\underline{{{}}}"))
    ours += pub
    if cell.status == "partial":
        ours += rf" {{\scriptsize [{len(cell.values)}/{cell.n_expected} seeds]}}"
        why = "; ".join(filter(None, [_tex_failed(cell), cell.note and _tex_escape(cell.note)]))
        if why:
            ours += notes.mark(why)
    return ours


def _tex_caption(result: TableResult) -> str:
    spec = result.spec
    text = (
        f"{_tex_escape(spec.title)}. Ours: mean $\\pm$ std over seeds {_seeds_text(spec.seeds)}, "
        r"in parentheses the published value; [$k$/$n$ seeds]: the mean of the $k$ seeds "
        r"that have a record. \textbf{Bold}: best, \underline{underlined}: second best per "
        r"block, among the cells with every seed. \emph{pending}: no record yet. "
        f"{_protocol_text(result, _tt, True)}"
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
    """A ``table`` float (needs ``\\usepackage{booktabs}``), labelled ``tab:<table name>``."""
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
            body.append(
                _tex_label(row.label, row.tex)
                + " & "
                + " & ".join(_tex_cell(cells[c.key], c, notes) for c in cols)
                + r" \\"
            )
    lines = [
        f"% {_tex_escape(spec.title)}: generated by lt_diffusion.table from its records.",
        r"% Needs \usepackage{booktabs} in the preamble (too wide for a column: wrap the tabular",
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
              "published", "diff", "status", "rank", "log", "note", "train_overrides",
              "eval_overrides")  # fmt: skip


def to_csv(result: TableResult) -> str:
    """One line per cell; the overrides in shell form (``shlex.split`` gives them back)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    train, evals = shlex.join(result.train_overrides), shlex.join(result.eval_overrides)
    for block, rows in result.blocks:
        for row, cells in rows:
            for col in result.columns:
                c = cells[col.key]
                writer.writerow({
                    "table": result.spec.name, "block": block.label, "row": row.label,
                    "column": col.key, "metric": col.metric, "mean": c.mean, "std": c.std,
                    "n": len(c.values), "seeds": c.n_expected, "published": c.published,
                    "diff": c.diff, "status": c.status, "rank": c.rank, "log": c.log,
                    "note": c.note, "train_overrides": train, "eval_overrides": evals,
                })  # fmt: skip
    return buf.getvalue()


def write_table(result: TableResult, out_dir: Path) -> dict[str, Path]:
    """``<out_dir>/<table>.md``, ``.tex`` and ``.csv``, each written atomically."""
    out_dir = Path(out_dir)
    name = result.spec.name
    return {
        "md": atomic_write_text(out_dir / f"{name}.md", to_markdown(result)),
        "tex": atomic_write_text(out_dir / f"{name}.tex", to_latex(result)),
        "csv": atomic_write_text(out_dir / f"{name}.csv", to_csv(result)),
    }
