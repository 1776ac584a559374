"""Concept dominance: the record's plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Four panels: the dominant and dominated shares over the sampling steps; each head's bias
    towards the dominant concept; the head ablations; each class's win rate against its
    training count."""
    import numpy as np

    from lt_diffusion.analysis.plots import new_figure, save_figure, scatter_vs_count, title_of

    res, ds = record["results"], record["dataset"]
    fig, (ax1, ax2, ax3, ax4) = new_figure(4)
    steps = range(len(res["timesteps"]))
    ax1.plot(steps, res["dominant_share_by_step"], label="dominant concept", color="tab:red")
    ax1.plot(steps, res["dominated_share_by_step"], label="dominated (mean)", color="tab:blue")
    ax1.set_xlabel("sampling step (t from T to 0)")
    ax1.set_ylabel("concept share of cross-attention")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax1.set_title(title_of(record, f"mean share gap {res['mean_share_gap']:.3f}"), fontsize=9)

    width = max(res["heads"])
    grid = np.full((len(res["layers"]), width), np.nan)
    for i, row in enumerate(res["head_bias"]):
        grid[i, : len(row)] = row
    im = ax2.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    ax2.set_yticks(range(len(res["layers"])))
    ax2.set_yticklabels([_short(layer) for layer in res["layers"]], fontsize=6)
    ax2.set_xlabel("head")
    ax2.set_title("head bias towards the dominant concept", fontsize=9)
    fig.colorbar(im, ax=ax2)

    ab = res.get("ablation")
    if ab:
        single = sorted(s["delta_dominant_share"] for s in ab["single_heads"])
        ax3.plot(range(len(single)), single, ".", color="gray", label="single heads (sorted)")
        for g in ab["groups"]:
            ax3.axhline(g["delta_share_gap"], ls="-" if g["kind"] == "top" else ":",
                        label=f"{g['kind']} {g['size']} heads: gap change")  # fmt: skip
        ax3.set_ylabel("change of the dominant concept's share")
        ax3.legend(fontsize=7)
    else:
        ax3.text(0.5, 0.5, "no head ablations (ablation_prompts: 0)", ha="center")
    ax3.set_title("head ablations", fontsize=9)

    counts, splits, names = ds["class_counts"], ds["splits"], ds.get("class_names")
    values: list[float | None] = [None] * len(counts)
    for e in res["per_concept"]:
        if e["class_index"] is not None:
            values[e["class_index"]] = e["win_rate"]["attention"]
    scatter_vs_count(ax4, values, counts, splits, names)
    rho = res["spearman_win_rate_vs_count"]["attention"]
    ax4.set_ylabel("win rate (attention)")
    ax4.set_title("dominance vs frequency" + (f", Spearman {rho:.2f}" if rho is not None else ""),
                  fontsize=9)  # fmt: skip
    ax4.legend(fontsize=8)
    return save_figure(fig, path)


def _short(layer: str) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0.attn2`` -> ``down0.1``."""
    parts = layer.split(".")
    stage = parts[0].replace("_blocks", "").replace("_block", "")
    nums = [p for p in parts[1:] if p.isdigit()]
    if stage == "mid":
        return f"mid.{nums[0]}" if nums else "mid"
    return f"{stage}{nums[0]}.{nums[1]}" if len(nums) > 1 else stage
