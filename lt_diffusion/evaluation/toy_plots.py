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
    per_line: int = 5,
) -> Path:
    """For each ``(label, points (N, D), labels (N,))`` a block of panels, one per class
    (``per_line`` to a line): the class's generated points (first two coordinates) over every
    mode's hit circle, the class's own modes filled in its split's colour, the other classes'
    as grey rings. A point in a grey ring is borrowed from another class."""
    num_classes = truth.num_classes
    lines = -(-num_classes // per_line)
    fig, axes = plt.subplots(
        lines * len(rows), per_line, figsize=(2.3 * per_line, 2.45 * lines * len(rows) + 0.4),
        squeeze=False, dpi=100,
    )  # fmt: skip
    centres = truth.mode_means[:, :2]
    try:
        for r, (label, points, labels) in enumerate(rows):
            for c in range(lines * per_line):
                ax = axes[r * lines + c // per_line, c % per_line]
                ax.set(xlim=(-1, 1), ylim=(-1, 1), aspect="equal", xticks=[], yticks=[])
                if c >= num_classes:
                    ax.axis("off")
                    continue
                colour = SPLIT_COLORS[splits[c]]
                for m, centre in enumerate(centres):
                    own = truth.mode_class[m] == c
                    style = {"fc": colour, "alpha": 0.35, "lw": 0} if own else {"fill": False}
                    ax.add_patch(Circle(centre, truth.hit_radius, ec="0.6", **style))
                mine = points[labels == c]
                ax.scatter(mine[:, 0], mine[:, 1], s=2, color="black", alpha=0.5, lw=0)
                ax.set_title(f"class {c}: {class_counts[c]} points ({splits[c]})", fontsize=8)
                if c % per_line == 0:
                    ax.set_ylabel(label, fontsize=9, fontweight="bold")
        fig.suptitle(
            "Generated points of each class (black) over the true modes: the class's own modes "
            "filled (blue many, orange medium, red few), other classes' as grey rings",
            fontsize=9,
        )
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)
