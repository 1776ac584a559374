"""Figures of the analyses: a per-class quantity against the class's training count (log x),
coloured by Many / Medium / Few, as in the CM paper's Fig. 1(b); written atomically as PNG."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes
import matplotlib.pyplot as plt  # noqa: E402

from lt_diffusion.evaluation.plots import save_figure, scatter_vs_count  # noqa: E402

__all__ = ["new_figure", "save_figure", "scatter_vs_count", "title_of"]


def new_figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    """A figure with ``ncols`` panels side by side."""
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), dpi=120, squeeze=False)
    return fig, list(axes[0])


def title_of(record: dict[str, Any], what: str) -> str:
    """``<dataset>, step <n>[, theta_g only]: <what>``."""
    ck = record["checkpoint"]
    extra = ", theta_g only" if ck.get("theta_g_only") else ""
    return f"{record['dataset']['name']}, step {ck['step']}{extra}: {what}"
