"""What defines a result: canonical digests of settings, so that a record (or a table cell)
made under other settings can never pass for this one.

A record is identified by the training settings of its run (everything that changes the
weights: data, imbalance, method, model, diffusion, optimizer, budget, precision, devices), the
evaluation protocol, the sampler that ran, the guidance and the model variant. Settings that
only say *where* things are (data root, outputs, caches, a pretrained folder) or *how often*
something is logged or saved do not enter: moving a run or logging more often keeps its
records.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lt_diffusion.utils.lazy import moved

# Training settings that do not change the trained weights (locations, logging, checkpoint
# cadence, sample grids, speed switches that keep the numbers). Dotted paths.
NOT_DEFINING = (
    "paths",
    "logger",
    "callbacks",  # checkpoints, grids, progress bar (their periods come from train.* too)
    "hydra",
    "run_name",
    "tag",
    "sampler",  # the run's default sampler and guidance: an evaluation records what it used
    "dataset.source.root",
    "dataset.source.download",
    "data.source",  # a copy of dataset.source
    "data.on_device",
    "model.pretrained",
    "model.latent_cache_dir",
    "train.init_from",  # a location; the run it names has its own identity
    "method.objective.teacher",  # consistency distillation's teacher: train.init_from again
    "method.objective.base.teacher",  # ... under CM (method=cm_cd)
    "train.compile",
    "train.threads",
    "train.channels_last",
    "train.ckpt_every",
    "train.keep_every",
    "train.grid_every",
    "train.grid_per_class",
    "train.grid_steps",
    "train.grid_clip_denoised",
    "train.log_every",
    "train.resume",
    "train.export",
)
# The Trainer settings that do change the weights; the rest (accelerator, logging cadence,
# model summary, anomaly detection, cuDNN benchmark) do not.
TRAINER_DEFINING = ("devices", "num_nodes", "precision", "accumulate_grad_batches")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, no NaN: the same settings always give the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def digest(obj: Any, length: int = 12) -> str:
    """``length`` hex digits of the SHA-256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def container(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """A plain, resolved dict of a config; ``paths`` (whose ``run_dir`` needs Hydra's runtime)
    is replaced by placeholders first, since no defining setting may depend on a location."""
    if isinstance(cfg, DictConfig):
        cfg = copy.deepcopy(cfg)
        if "paths" in cfg:
            OmegaConf.set_struct(cfg, False)
            for key in list(cfg.paths):
                cfg.paths[key] = f"<paths.{key}>"
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return copy.deepcopy(dict(cfg))


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key)  # type: ignore[assignment]
        if not isinstance(tree, dict):
            return
    tree.pop(leaf, None)


def training_settings(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The settings of a training config that define its weights (see :data:`NOT_DEFINING`)."""
    out = container(cfg)
    for dotted in NOT_DEFINING:
        _drop(out, dotted)
    trainer = out.get("trainer")
    if isinstance(trainer, dict):
        out["trainer"] = {k: trainer[k] for k in TRAINER_DEFINING if k in trainer}
    return out


# Moved to lt_diffusion.evaluation.identity (they read the metric registry and statistics files).
__getattr__ = moved(__name__, ("lt_diffusion.evaluation.identity",))
