"""Per-class (or per-split) FID against the class's training count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLIT_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_fid_vs_count(record: dict[str, Any], path: str | Path) -> Path | None:
    """Scatter of FID against training count (log x), coloured by split; None if no FID."""
    counts = record["dataset"]["class_counts"]
    splits = record["dataset"]["splits"]
    metrics = record["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    per_class = {k: v for k, v in metrics.get("per_class", {}).items() if "fid" in v}
    if per_class:
        for name, m in per_class.items():
            c = int(name.split("_")[-1])
            ax.scatter(counts[c], m["fid"], color=SPLIT_COLORS[splits[c]], label=splits[c])
            ax.annotate(
                str(c), (counts[c], m["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        title = "per-class FID"
    else:
        per_split = {k: v for k, v in metrics.get("per_split", {}).items() if "fid" in v}
        if not per_split:
            plt.close(fig)
            return None
        for split, m in per_split.items():
            members = [counts[c] for c in range(len(counts)) if splits[c] == split]
            mean_count = sum(members) / len(members)
            ax.scatter(mean_count, m["fid"], color=SPLIT_COLORS[split], s=60, label=split)
        title = "per-split FID (x: mean training count of the split)"
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("FID")
    ax.set_title(f"{record['dataset']['name']}: {title}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
