"""The synthetic benchmark's derived tables, from a table's CSV and its runs' training logs
(what docs/toy_benchmark.md shows beside the tables ``ltd-table`` writes):

* **the share of DDPM's gap closed**: per block, column and method row, the method's paired
  difference from DDPM (the table's ``diff``, over the seeds) divided by DDPM's gap to floor (a),
  the exact score through the same sampler (that row's ``diff``, with the sign flipped): 100%
  reaches the floor, 0% is DDPM, below 0 is worse than DDPM. The interval is the difference's
  95% interval divided by the same gap; the mark is the table's (Holm-adjusted paired test).
* **OC's cross-class transfer per timestep bucket**: for each OC-based row (``--oc-rows``), the
  mean over its seeds and over the run of ``cross_t0`` ... ``cross_t9`` in
  ``<run_dir>/train_log.csv``: the share of anchors of each tenth of the timesteps whose target
  came from another class.

    .venv/bin/python scripts/toy_report.py --table toy2d_methods          # outputs/tables/...
    .venv/bin/python scripts/toy_report.py --table toy2d_shared_methods --no-oc

Writes ``<output_dir>/tables/<table>_report.md`` and prints it.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOOR = "Floor (a): true score"
MARKS = {"better": " ▲", "worse": " ▼"}


def read_cells(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    """``(block, row, column key) -> CSV row`` of a table's CSV."""
    with open(path, newline="") as f:
        return {(r["block"], r["row"], r["column"]): r for r in csv.DictReader(f)}


def _num(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def gap_table(
    cells: dict[tuple[str, str, str], dict[str, str]], block: str, labels: dict[str, str]
) -> str:
    """Markdown: the share of DDPM's gap to floor (a) each method row closes, per column (where
    floor (a) is better than DDPM by the table's test; n/a elsewhere, e.g. memorisation)."""
    columns = list(dict.fromkeys(c for b, _, c in cells if b == block))
    baseline = cells[next(k for k in cells if k[0] == block)]["baseline"]
    rows = [r for r in dict.fromkeys(r for b, r, _ in cells if b == block)
            if not r.startswith("Floor") and r != baseline]  # fmt: skip
    head = "| | " + " | ".join(labels[c] for c in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    gap_row = ["DDPM's gap to floor (a)"]
    gaps = {}
    for c in columns:
        floor = cells.get((block, FLOOR, c))
        gap = None if floor is None or floor["mark"] != "better" else _num(floor["diff"])
        gaps[c] = None if gap is None or gap == 0 else -gap
        gap_row.append("n/a" if gaps[c] is None else f"{gaps[c]:+.3f}")
    lines.append("| " + " | ".join(gap_row) + " |")
    for r in rows:
        out = [r]
        for c in columns:
            cell, gap = cells[(block, r, c)], gaps[c]
            diff, lo, hi = (_num(cell[k]) for k in ("diff", "ci_low", "ci_high"))
            if gap is None or diff is None:
                out.append("n/a")
                continue
            share = [-v / gap * 100 + 0.0 for v in (diff, lo, hi) if v is not None]
            share = [round(v) + 0 for v in share]  # no "-0"
            interval = f" [{min(share[1:])}, {max(share[1:])}]" if len(share) == 3 else ""
            out.append(f"{share[0]}%{interval}{MARKS.get(cell['mark'], '')}")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def oc_buckets(out: Path, table: str, blocks: list[str], rows: list[str]) -> str:
    """Markdown: OC-based rows' mean cross-class transfer per timestep bucket (train logs)."""
    from lt_diffusion.tables import load_table_by_name, resolve

    spec = load_table_by_name(table)
    overrides = [f"paths.output_dir={out}"]
    runs = {r.run: r for r in resolve(spec, overrides, overrides)}
    lines = ["| block | row | " + " | ".join(f"t {k * 100}-{k * 100 + 99}" for k in range(10))
             + " | all |", "|---" * 13 + "|"]  # fmt: skip
    for block in spec.blocks:
        if block.label not in blocks:
            continue
        for row in block.rows:
            if row.label not in rows:
                continue
            per_key: dict[str, list[float]] = defaultdict(list)
            for seed in spec.seeds:
                run = spec.run_ref(row.experiments[spec.columns[0].key], seed, row.overrides)
                log = runs[run].run_dir / "train_log.csv"
                if not log.is_file():
                    continue
                with open(log, newline="") as f:
                    entries = list(csv.DictReader(f))
                for key in [f"cross_t{k}" for k in range(10)] + ["cross_transfer"]:
                    values = [_num(e.get(key, "")) for e in entries]
                    values = [v for v in values if v is not None]
                    if values:
                        per_key[key].append(statistics.fmean(values))
            if not per_key:
                continue
            cells = [f"{statistics.fmean(per_key[f'cross_t{k}']):.3f}" for k in range(10)]
            cells.append(f"{statistics.fmean(per_key['cross_transfer']):.3f}")
            lines.append(f"| {block.label} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="toy2d_methods")
    parser.add_argument("--output-dir", default=str(ROOT / "outputs"))
    parser.add_argument("--no-oc", action="store_true", help="skip the OC transfer table")
    parser.add_argument(
        "--oc-rows", nargs="+", default=["OC", "OC, ties rejected", "CM"],
        help="rows whose training logs hold OC's transfer terms",
    )  # fmt: skip
    args = parser.parse_args()
    from lt_diffusion.tables import load_table_by_name

    out = Path(args.output_dir).resolve()
    cells = read_cells(out / "tables" / f"{args.table}.csv")
    labels = {c.key: c.label for c in load_table_by_name(args.table).columns}
    blocks = list(dict.fromkeys(b for b, _, _ in cells))
    parts = [f"## {args.table}: the share of DDPM's gap to floor (a) closed\n"]
    for block in blocks:
        if (block, FLOOR, next(c for b, _, c in cells if b == block)) in cells:
            parts += [f"*{block}*\n", gap_table(cells, block, labels), ""]
    if not args.no_oc:
        parts += [
            f"## {args.table}: OC's cross-class transfer rate per timestep bucket\n",
            oc_buckets(out, args.table, blocks, args.oc_rows),
            "",
        ]
    text = "\n".join(parts)
    path = out / "tables" / f"{args.table}_report.md"
    path.write_text(text)
    print(text)
    print(f"Report: {path}")


if __name__ == "__main__":
    main()
