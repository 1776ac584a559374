"""Per-class (or per-split) FID, or KID ± std for small comparisons, against the class's
training count: where the long tail hurts."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes
import matplotlib.pyplot as plt  # noqa: E402

from lt_diffusion.evaluation.record import class_index  # noqa: E402
from lt_diffusion.records.base import SPLIT_NAMES
from lt_diffusion.utils.io import atomic_write_bytes  # noqa: E402

SPLIT_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def scatter_vs_count(
    ax: Any,
    values: Sequence[float | None],
    counts: Sequence[int],
    splits: Sequence[str],
    names: Sequence[str] | None = None,
    marker: str = "o",
    label_prefix: str = "",
) -> None:
    """Scatter the defined per-class ``values`` against ``counts`` (log x), one colour a split;
    class names are written next to the points when at most 20 are drawn."""
    for split in SPLIT_NAMES:
        cs = [c for c, v in enumerate(values) if v is not None and splits[c] == split]
        if cs:
            ax.scatter(
                [max(counts[c], 1) for c in cs],
                [values[c] for c in cs],
                color=SPLIT_COLORS[split],
                marker=marker,
                label=f"{label_prefix}{split}",
                zorder=3,
            )
    defined = [(c, v) for c, v in enumerate(values) if v is not None]
    if names is not None and len(defined) <= 20:  # labels stay readable
        for c, v in defined:
            ax.annotate(
                names[c], (max(counts[c], 1), v), fontsize=7, xytext=(3, 3),
                textcoords="offset points",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory, close it, then write the file atomically."""
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _value(entry: Any, name: str) -> float | None:
    v = entry.get(name) if isinstance(entry, dict) else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _shown(entries: list[Any]) -> str:
    """The metric a plot of these entries shows: KID (± std) when they are small comparisons
    with KID as their primary number (FID is biased there), else FID."""
    small = [e for e in entries if isinstance(e, dict) and e.get("primary") == "kid"]
    return "kid" if entries and len(small) == len(entries) else "fid"


def plot_fid_vs_count(record: dict[str, Any], path: str | Path) -> Path | None:
    """Scatter FID against training images per class (log x), coloured by split, into a PNG
    (written atomically). Per-class values when the record has them; otherwise each split's as
    a bar spanning its classes' counts. Small comparisons (KID their primary number, FID biased
    at their n) show KID with its std over subsets as error bars instead, and the title says
    why. Returns the path, or None when the record has neither."""
    dataset = record["dataset"]
    counts, splits = dataset["class_counts"], dataset["splits"]
    names = dataset.get("class_names") or [str(c) for c in range(len(counts))]
    metrics = record["metrics"]
    classes = metrics.get("per_class", {})
    name = _shown(list(classes.values()) or list(metrics.get("per_split", {}).values()))
    label = "KID (± std over subsets)" if name == "kid" else "FID"
    per_class = {
        class_index(k): _value(v, name) for k, v in classes.items() if _value(v, name) is not None
    }
    per_split = {
        s: _value(v, name)
        for s, v in metrics.get("per_split", {}).items()
        if _value(v, name) is not None
    }
    if not per_class and not per_split:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        if per_class:
            values = [per_class.get(c) for c in range(len(counts))]
            scatter_vs_count(ax, values, counts, splits, names)
            if name == "kid":
                for c, v in per_class.items():
                    std = _value(classes[f"class_{c:03d}"], "kid_std") or 0.0
                    ax.errorbar(max(counts[c], 1), v, yerr=std, color=SPLIT_COLORS[splits[c]],
                                capsize=3, lw=1, zorder=2)  # fmt: skip
            first = next(iter(classes.values()))
            n = first.get("n_generated")
            what = f"per-class {label.split(' ')[0]} ({n} generated per class)"
        else:
            for split in SPLIT_NAMES:
                if split not in per_split:
                    continue
                member = [max(counts[c], 1) for c in range(len(counts)) if splits[c] == split]
                lo, hi = min(member), max(member)
                v = per_split[split]
                ax.plot([lo, hi], [v, v], color=SPLIT_COLORS[split], lw=3, label=split)
                ax.scatter([math.sqrt(lo * hi)], [v], color=SPLIT_COLORS[split], zorder=3)
                if name == "kid":
                    std = _value(metrics["per_split"][split], "kid_std") or 0.0
                    ax.errorbar([math.sqrt(lo * hi)], [v], yerr=std, color=SPLIT_COLORS[split],
                                capsize=3, lw=1)  # fmt: skip
            first = metrics["per_split"][next(iter(per_split))]
            n = first.get("n_generated")
            what = (
                f"per-split {label.split(' ')[0]} ({n} generated per split; bar: the split's "
                "class counts)"
            )
        if name == "kid":
            what += f"\nsmall samples: FID is biased at n = {n}, so KID ± std is shown"
        overall = _value(metrics.get("overall") or {}, name)
        if overall is not None:  # the value depends on n: the label says which n
            n_all = metrics["overall"].get("n_generated")
            digits = 4 if name == "kid" else 2
            ax.axhline(
                overall, color="gray", ls="--", lw=1,
                label=f"overall {overall:.{digits}f} (n={n_all})",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (log scale)")
        ax.set_ylabel(label)
        ax.set_title(f"{dataset['name']}: {what}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)
