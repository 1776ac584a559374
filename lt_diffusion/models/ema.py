"""Exponential moving average of the weights; sampling uses the EMA copy (Ho et al.)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    One fused ``_foreach_lerp_`` per dtype group: no Python loop over tensors on the hot path.
    """
    ema_params = [p for p in ema_model.parameters()]
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise RuntimeError("EMA model and model have different parameter lists")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema_model.buffers(), model.buffers()):
        eb.copy_(b)
