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


def plot_fidelity_diversity(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    reference: tuple[str, np.ndarray, np.ndarray] | None,
    splits: Sequence[str],
    path: str | Path,
    diversity: str = "coverage",
    per_line: int = 5,
) -> Path:
    """One panel per method: each class's fidelity (mode precision, x) against its diversity
    (``diversity``, y: coverage, or the unobserved recall of the transfer variant), the means
    over seeds, coloured by split; ``reference`` (e.g. DDPM) in grey on every panel, with a
    line from each of its classes to the method's. Coverage is at most the precision: the
    diagonal bounds it."""
    lines = -(-len(panels) // per_line)
    fig, axes = plt.subplots(
        lines, per_line, figsize=(2.6 * per_line, 2.7 * lines + 0.5), squeeze=False, dpi=100
    )
    colours = [SPLIT_COLORS[s] for s in splits]
    try:
        for i in range(lines * per_line):
            ax = axes[i // per_line, i % per_line]
            if i >= len(panels):
                ax.axis("off")
                continue
            label, fidelity, div = panels[i]
            ax.set(xlim=(0, 1.02), ylim=(0, 1.02), aspect="equal")
            ax.plot([0, 1], [0, 1], color="0.85", lw=0.8, zorder=0)
            if reference is not None and reference[0] != label:
                _, rf, rd = reference
                ax.scatter(rf, rd, s=14, color="0.6", zorder=1)
                for k in range(len(rf)):
                    if np.isfinite(rd[k]) and np.isfinite(div[k]):
                        ax.plot([rf[k], fidelity[k]], [rd[k], div[k]], color="0.8", lw=0.6)
            ax.scatter(fidelity, div, s=18, c=colours, zorder=2)
            ax.set_title(label, fontsize=8)
            ax.tick_params(labelsize=7)
            if i % per_line == 0:
                ax.set_ylabel(diversity, fontsize=8)
            if i // per_line == lines - 1:
                ax.set_xlabel("mode precision", fontsize=8)
        ref = f"; grey: {reference[0]}" if reference is not None else ""
        fig.suptitle(
            f"Fidelity (mode precision) against diversity ({diversity}) per class, the mean over "
            f"seeds: blue many, orange medium, red few{ref}",
            fontsize=9,
        )
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)
