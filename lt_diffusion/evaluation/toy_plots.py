"""Generated points of the synthetic benchmark, drawn per class against the true modes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

from lt_diffusion.data.toy import GaussianMixtureClasses  # noqa: E402
from lt_diffusion.evaluation.plots import SPLIT_COLORS, save_figure  # noqa: E402


def plot_points_per_class(
    truth: GaussianMixtureClasses,
    rows: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_counts: Sequence[int],
    splits: Sequence[str],
    path: str | Path,
) -> Path:
    """One row of panels per ``(label, points (N, D), labels (N,))``, one panel per class:
    the class's generated points (first two coordinates) over every mode's hit circle, the
    class's own modes drawn in its split's colour, the others in grey. A point in a grey
    circle is borrowed from another class."""
    num_classes = truth.num_classes
    fig, axes = plt.subplots(
        len(rows), num_classes, figsize=(1.75 * num_classes, 1.95 * len(rows) + 0.3),
        squeeze=False, dpi=110,
    )  # fmt: skip
    centres = truth.mode_means[:, :2]
    try:
        for r, (label, points, labels) in enumerate(rows):
            for c in range(num_classes):
                ax = axes[r, c]
                colour = SPLIT_COLORS[splits[c]]
                for m, centre in enumerate(centres):
                    own = truth.mode_class[m] == c
                    ax.add_patch(
                        Circle(
                            centre, truth.hit_radius, fill=own, alpha=0.25 if own else 1.0,
                            color=colour if own else "0.7", lw=0.6,
                        )
                    )  # fmt: skip
                mine = points[labels == c]
                ax.scatter(mine[:, 0], mine[:, 1], s=1.5, color="black", alpha=0.6, lw=0)
                ax.set(xlim=(-1, 1), ylim=(-1, 1), aspect="equal", xticks=[], yticks=[])
                if r == 0:
                    ax.set_title(f"class {c}\n{class_counts[c]} train, {splits[c]}", fontsize=7)
                if c == 0:
                    ax.set_ylabel(label, fontsize=7)
        fig.suptitle(
            "Generated points per class (black) over the true modes: filled = the class's own "
            "(coloured by split), grey rings = other classes' (points there are borrowed)",
            fontsize=8,
        )
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)
