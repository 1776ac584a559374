"""Figures of a synthetic-benchmark table (PNGs next to the table):

* ``<table>_points.png``: generated points per class, DDPM against the best other method row,
  for one seed, drawn over the true modes;
* ``<table>_fidelity_diversity.png``: one panel per method row, each class's fidelity (mode
  precision) against its diversity (coverage), the means over the seeds, DDPM's in grey.

    .venv/bin/python scripts/plot_toy.py                                  # table=toy2d_methods
    .venv/bin/python scripts/plot_toy.py --table toy2d_demo --column cov_few

The best row is the method row (not a floor) with the best mean over the seeds that have a
record, in ``--column`` of ``--block`` (by the column's own ``better``; default Few SW, a
distance to the truth: borrowing, say, would crown a method that generates nothing on any mode,
as CM's collapsed seeds do); the points are
regenerated from the two runs' checkpoints exactly as their records' evaluation generated them
(the protocol's sampler, guidance, seed and chunks). The fidelity-diversity figure reads the
records only.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.diffusion import generate_vectors
from lt_diffusion.evaluation.toy import class_truth
from lt_diffusion.evaluation.toy_plots import plot_fidelity_diversity, plot_points_per_class
from lt_diffusion.records.base import read_record
from lt_diffusion.runs.build import build_datamodule, build_sampler, build_schedule
from lt_diffusion.runs.load import load_sampling_model
from lt_diffusion.tables import load_table_by_name, resolve
from lt_diffusion.tables.aggregate import metric_value
from lt_diffusion.utils.threads import torch_threads


def evaluated_points(record_path: Path) -> tuple[np.ndarray, np.ndarray, dict, DictConfig]:
    """The points the evaluation behind ``record_path`` generated, regenerated from its
    checkpoint with the sampler, guidance, seed and chunks the record states (generation is
    deterministic); also the record and the run's training config."""
    record = read_record(record_path)
    protocol = record["protocol"]
    model, meta = load_sampling_model(record["checkpoint"]["path"])
    train_cfg = OmegaConf.create(meta["config"])
    sampler = build_sampler(OmegaConf.create(record["sampler"]), build_schedule(train_cfg))
    per_class = record["generated_per_class"]
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])
    with torch_threads(protocol.get("threads")):
        points = generate_vectors(
            model, sampler, labels, seed=int(protocol["seed"]),
            batch_size=int(protocol["batch_size"]), guidance=float(record["sampler"]["guidance"]),
        )  # fmt: skip
    return points.numpy(), labels.numpy(), record, train_cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="toy2d_methods")
    parser.add_argument("--output-dir", default="outputs", help="the table's paths.output_dir")
    parser.add_argument("--block", default="IR=100", help="label of the block to compare in")
    parser.add_argument("--column", default="sw_few", help="column key that picks 'best'")
    parser.add_argument("--baseline", default="DDPM", help="label of the baseline row")
    parser.add_argument("--seed", type=int, default=0, help="the seed whose points are drawn")
    args = parser.parse_args()

    spec = load_table_by_name(args.table)
    out = Path(args.output_dir).resolve()
    overrides = [f"paths.output_dir={out}"]
    runs = {r.run: r for r in resolve(spec, overrides, overrides)}
    block = next((b for b in spec.blocks if b.label == args.block), None)
    column = next((c for c in spec.columns if c.key == args.column), None)
    if block is None or column is None:
        raise SystemExit(
            f"no block {args.block!r} or column {args.column!r} in table {spec.name}: blocks "
            f"{[b.label for b in spec.blocks]}, columns {[c.key for c in spec.columns]}"
        )

    def records(row) -> dict[int, Path]:
        paths = {}
        for ev in spec.cell_evals(row, column):
            resolved = runs[ev.run]
            if resolved.record_problem(ev) is None:
                paths[ev.run.seed] = resolved.records[ev]
        return paths

    methods = [row for row in block.rows if row.eval is None]  # not the floors
    scores = {}
    for row in methods:
        values = [metric_value(read_record(p), column.metric) for p in records(row).values()]
        values = [v for v in values if v is not None]
        if values and row.label != args.baseline:
            scores[row.label] = statistics.fmean(values)
    if not scores:
        raise SystemExit(
            f"no records for {args.block} yet: run lt_diffusion.table table={spec.name}"
        )
    pick = min if column.better == "lower" else max
    best = pick(scores, key=scores.get)
    chosen = {row.label: row for row in block.rows if row.label in (args.baseline, best)}
    panels = []
    for label in (args.baseline, best):
        path = records(chosen[label]).get(args.seed)
        if path is None:
            raise SystemExit(f"{label} has no record of seed {args.seed} in {args.block}")
        points, labels, record, train_cfg = evaluated_points(path)
        value = metric_value(record, column.metric)
        panels.append((f"{label}\n{column.label} {value:.3f}", points, labels))
    datamodule = build_datamodule(train_cfg)
    datamodule.setup()
    info = datamodule.info()
    png = out / "tables" / f"{spec.name}_points.png"
    plot_points_per_class(
        class_truth(datamodule), panels, info["class_counts"], info["splits"], png
    )
    print(f"best in {args.block} by {column.label}: {best} ({scores[best]:.3f} mean over seeds)")
    print(f"Plot: {png}")

    num = len(info["class_counts"])

    def per_class(row, metric: str) -> np.ndarray:
        """The row's per-class means over its seeds' records."""
        values = np.full((len(records(row)) or 1, num), np.nan)
        for i, p in enumerate(records(row).values()):
            rec = read_record(p)
            for c in range(num):
                v = metric_value(rec, f"per_class.class_{c:03d}.{metric}")
                values[i, c] = np.nan if v is None else v
        return np.nanmean(values, axis=0)

    panels = [
        (row.label, per_class(row, "mode_precision"), per_class(row, "mode_coverage"))
        for row in methods
        if records(row)
    ]
    reference = next((p for p in panels if p[0] == args.baseline), None)
    png = out / "tables" / f"{spec.name}_fidelity_diversity.png"
    plot_fidelity_diversity(panels, reference, info["splits"], png)
    print(f"Plot: {png}")


if __name__ == "__main__":
    main()
