"""Every random state a training step draws from, captured into a checkpoint and restored on
resume, so a resumed run continues the very sequence an uninterrupted one would have drawn.

What a step draws: timesteps, noise, per-sample label dropout and model dropout from torch's
global CPU / CUDA generators; the batch-level CFG coin from the objective's host
``random.Random`` (one per objective, wrapped ones included); Python's and NumPy's global
generators (nothing here draws from them, but user augmentations may). The batch stream needs
no state: batch ``k`` is a pure function of ``(data.seed, rank, k)`` and ``k`` comes from the
restored global step (:class:`lt_diffusion.data.datamodule.BatchStream`).

Under DDP every rank has its own states; the checkpoint, written by rank 0 alone, holds the
list of all ranks' states (gathered when it is written), and each rank restores its own entry.
Everything is stored as plain tensors, ints and lists, so ``torch.load(weights_only=True)``
reads it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lt_diffusion.methods.base import Objective

RNG_KEY = "lt_diffusion_rng"


def _numpy_state() -> dict[str, Any]:
    state = np.random.get_state(legacy=False)  # noqa: NPY002 - the global one is the point
    return {
        "key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
        "pos": int(state["state"]["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    key = state["key"].numpy().astype(np.uint32)
    legacy = ("MT19937", key, state["pos"], state["has_gauss"], state["gauss"])
    np.random.set_state(legacy)  # noqa: NPY002 - the global generator is what is restored


def capture(objective: Objective, device: torch.device | None = None) -> dict[str, Any]:
    """This process's random states (``device``: the CUDA device this rank trains on)."""
    cuda = None
    # Only a generator that exists can have been drawn from; asking would initialise CUDA.
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "objective": objective.host_rng_state(),
    }


def restore(
    state: dict[str, Any], objective: Objective, device: torch.device | None = None
) -> None:
    """Put back what :func:`capture` returned (in the same process layout)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
    objective.load_host_rng_state(state["objective"])


def gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``state``, in rank order (just ``[state]`` without a process group).

    A collective: every rank must call it (checkpoint writes run on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
