"""One analysis of a trained run, end to end: settings checked, checkpoint loaded, results
computed, record and plot written (``ltd-analyze`` and the table's evaluations run this)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lt_diffusion.analysis import ANALYSES
from lt_diffusion.analysis.common import (
    build_analysis_record,
    load_analysed_run,
    record_paths,
    settings_from_config,
)
from lt_diffusion.records.base import write_record
from lt_diffusion.runtime import code_version


def _summary_lines(record: dict[str, Any]) -> list[str]:
    """A few lines of the results for the terminal."""
    res = record["results"]
    keys = ("per_split", "spearman_vs_count", "overall_purity", "majority_ratio")
    lines = [f"  {key}: {res[key]}" for key in keys if key in res]
    for part, summary in res.get("parts", {}).items():
        lines.append(
            f"  {part}: {summary['dominated_fraction']} of {summary['n_defined']} tensors "
            "dominated by the majority"
        )
    return lines


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate the settings, load the run, compute, write the record and the plot; returns
    the record."""
    name = cfg.analysis.get("name")
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}: choose analysis= one of {sorted(ANALYSES)}")
    module, settings_cls = ANALYSES[name]
    settings = settings_from_config(settings_cls, cfg.analysis)  # before any loading
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.theta_g_only and not getattr(module, "SUPPORTS_THETA_G_ONLY", True):
        raise ValueError(
            f"{name} measures the full model (theta_g and the low-rank part separately): "
            "run it without theta_g_only"
        )
    if not cfg.checkpoint:
        raise ValueError("give checkpoint=<run_dir>/checkpoints/last.ckpt (the run to analyse)")
    started = time.time()
    loaded = load_analysed_run(
        cfg.checkpoint, cfg.device, bool(cfg.ema), cfg.data_root, bool(cfg.theta_g_only),
        text_to_image=getattr(module, "BACKBONE", "pixel") == "text_to_image",
    )  # fmt: skip
    print(
        f"Analysis {name} of {loaded.meta['checkpoint']} (step {loaded.meta['global_step']}, "
        f"{loaded.info['name']}, {loaded.info['num_classes']} classes) on {loaded.device}",
        flush=True,
    )
    json_path, png_path = record_paths(
        loaded.run_dir, name, loaded.theta_g_only, cfg.get("out_dir")
    )
    if cfg.get("record"):  # an explicit record file (the plot goes beside it)
        json_path = Path(cfg.record)
        png_path = json_path.with_suffix(".png")
    results = module.compute(loaded, settings, int(cfg.batch_size), bool(cfg.progress))
    results["seconds"] = round(time.time() - started, 2)
    record = build_analysis_record(name, settings, loaded, results, code_version())
    if hasattr(module, "validate"):  # an analysis with a record schema checks it before writing
        module.validate(record)
    write_record(json_path, record)  # validated as its kind, then atomically
    module.plot(record, png_path)
    print("\n".join(_summary_lines(record)))
    print(f"Record: {json_path}\nPlot: {png_path}")
    return record
