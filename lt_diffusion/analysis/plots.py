"""Figures of the analyses: a per-class quantity against the class's training count (log x),
coloured by Many / Medium / Few, as in the CM paper's Fig. 1(b); written atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes
import matplotlib.pyplot as plt  # noqa: E402

from lt_diffusion.data.splits import SPLITS  # noqa: E402
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
    class names are written next to the points when there are at most 20 classes."""
    for split in SPLITS:
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
    if names is not None and len(values) <= 20:  # labels stay readable
        for c, v in enumerate(values):
            if v is not None:
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


def new_figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    """A figure with ``ncols`` panels side by side."""
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), dpi=120, squeeze=False)
    return fig, list(axes[0])


def title_of(record: dict[str, Any], what: str) -> str:
    """``<dataset>, step <n>[, theta_g only]: <what>``."""
    ck = record["checkpoint"]
    extra = ", theta_g only" if ck.get("theta_g_only") else ""
    return f"{record['dataset']['name']}, step {ck['step']}{extra}: {what}"
