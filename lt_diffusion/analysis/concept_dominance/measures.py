"""Concept dominance: the measures of one trajectory (saturation, wins, dominance, head
bias) on the traced shares."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def saturation(curve: Sequence[float], level: float) -> int:
    """The first step at which ``curve`` has covered ``level`` of its rise from step 0 to its
    maximum (0 when it never rises)."""
    start, top = curve[0], max(curve)
    if top <= start:
        return 0
    threshold = start + level * (top - start)
    return next(i for i, v in enumerate(curve) if v >= threshold - 1e-12)


def wins(a: Tensor, b: Tensor) -> Tensor:
    """1 where ``a > b``, 0.5 where equal, 0 where below."""
    return (a > b).double() + 0.5 * (a == b).double()


def share_gap(shares: Tensor, dominant: Tensor) -> Tensor:
    """Share of the dominant concept minus the mean share of the others, ``shares`` (..., K)
    with ``dominant`` (...) broadcast over the leading dimensions."""
    k = shares.shape[-1]
    dom = shares.gather(-1, dominant.unsqueeze(-1)).squeeze(-1)
    return dom - (1.0 - dom) / (k - 1)


def dominance(shares: Tensor) -> tuple[Tensor, Tensor]:
    """From shares ``(P, images, steps, heads, K)``: each prompt's share by step ``(P, steps,
    K)`` (mean over images and heads) and its dominant concept ``(P,)`` (largest mean over the
    trajectory)."""
    by_step = shares.mean(dim=(1, 3))
    return by_step, by_step.mean(1).argmax(-1)


def head_bias(shares: Tensor, dominant: Tensor) -> Tensor:
    """Per head ``(heads,)``: its share of each prompt's dominant concept minus the mean share
    of the others, averaged over prompts, images and steps (how much the head favours the
    concept that dominates)."""
    p, n_img, n_steps, n_heads, _ = shares.shape
    dom = dominant.view(-1, 1, 1, 1).expand(p, n_img, n_steps, n_heads)
    return share_gap(shares, dom).mean(dim=(0, 1, 2))


def per_layer(values: Tensor, layers: Sequence[str], heads: dict[str, int]) -> list[list[float]]:
    """Split a per-head vector (heads of all layers in order) into one list per layer."""
    out, start = [], 0
    for layer in layers:
        out.append([float(v) for v in values[start : start + heads[layer]]])
        start += heads[layer]
    return out
