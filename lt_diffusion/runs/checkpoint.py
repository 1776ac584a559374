"""Checkpoints: atomic writes, validation before use, and the safetensors export of the EMA
weights (loading a model from either: :mod:`lt_diffusion.runs.load`).

A Lightning checkpoint of this project carries an ``lt_diffusion`` entry with the resolved
config and the dataset description, so a checkpoint alone is enough to rebuild its model.
The export (``<run_dir>/export/``) is the same EMA model without pickles: ``ema.safetensors``
and the resolved ``config.yaml`` beside it (:func:`export_ema`; read by :func:`lt_diffusion.runs.load.load_exported`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.utils.identity import training_settings
from lt_diffusion.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_text

META_KEY = "lt_diffusion"
LAST = "last.ckpt"
EXPORT_WEIGHTS = "ema.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_FORMAT = "lt_diffusion.export/1"

# A run may be resumed under another budget (train.max_steps: a longer run continues) and on
# other hardware (trainer: devices, precision; see docs/training.md on what that changes); every
# other setting that defines the weights (lt_diffusion.utils.identity) must be the same.
RESUMABLE_CHANGES = ("train.max_steps", "trainer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, foreign, or from another experiment."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file in place of a good one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        atomic_torch_save(checkpoint, Path(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, with a clear error when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Train a model first (python -m lt_diffusion.train ...) "
            "or pass the path of an existing .ckpt file."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]}). "
            "It may be truncated or not a PyTorch file: delete it to restart that run from "
            "scratch, or point at another checkpoint."
        ) from err
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} was not written by lt-diffusion (no '{META_KEY}' metadata); "
            "point at a checkpoint from python -m lt_diffusion.train."
        )
    return ckpt


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _same_target(a: Any, b: Any) -> bool:
    """Whether two ``_target_`` paths name the same object: a run saved before a class moved
    (``lt_diffusion.methods.DDPMObjective``, now ``lt_diffusion.methods.ddpm.DDPMObjective``)
    is the same run."""
    from hydra.utils import get_object

    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return get_object(a) is get_object(b)
    except Exception:  # a path that no longer imports names nothing to compare
        return False


def config_differences(saved: dict | DictConfig, current: dict | DictConfig) -> list[str]:
    """The settings that define a run's weights (:func:`training_settings`) on which two
    configs disagree, as readable lines (budget and hardware may differ: a resume)."""
    a, b = (_flatten(training_settings(c)) for c in (saved, current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUMABLE_CHANGES) or a.get(key) == b.get(key):
            continue
        if key.rsplit(".", 1)[-1] == "_target_" and _same_target(a.get(key), b.get(key)):
            continue
        diffs.append(f"{key}: checkpoint has {a.get(key)!r}, config has {b.get(key)!r}")
    return diffs


def check_compatible(ckpt: dict[str, Any], cfg: DictConfig, path: str | Path) -> None:
    """Refuse to resume a checkpoint that belongs to another experiment, or under another
    budget when the learning-rate schedule depends on it (``train.lr_schedule: cosine``)."""
    saved = ckpt[META_KEY]["config"]
    if cfg.train.get("lr_schedule", "constant") != "constant":
        before = int(saved["train"]["max_steps"])
        if before != int(cfg.train.max_steps):
            raise CheckpointError(
                f"Checkpoint {path} was trained towards train.max_steps={before} under "
                f"train.lr_schedule={cfg.train.lr_schedule}, whose learning rate depends on the "
                f"budget: continuing it to {cfg.train.max_steps} would not be a run of that "
                "budget. Use another run directory (e.g. tag=-steps<N>) or the original budget."
            )
    diffs = config_differences(saved, cfg)
    if diffs:
        raise CheckpointError(
            f"Checkpoint {path} does not match this run's config:\n  "
            + "\n  ".join(diffs)
            + "\nUse another run directory (change run_name or seed) or restore the original "
            "settings."
        )


def model_state(ckpt: dict[str, Any], ema: bool = True) -> dict[str, torch.Tensor]:
    """The (EMA) model weights of a training checkpoint, without the module prefix."""
    prefix = "ema_model." if ema else "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint has no '{prefix}*' weights")
    return state


def export_ema(state: dict[str, Any], meta: dict[str, Any], folder: str | Path) -> Path:
    """Write an EMA model's ``state_dict`` as ``<folder>/ema.safetensors`` and its resolved
    config as ``<folder>/config.yaml``, each atomically; returns ``folder``.

    ``meta`` holds ``config`` (the resolved run config), ``dataset`` (class names, counts,
    splits), ``global_step`` and ``code_version``; all but the config go into the file's
    safetensors metadata (strings). A latent or Stable Diffusion backbone's state leaves its
    frozen pretrained weights out (autoencoder, text encoder, the LoRA-frozen U-Net): the
    export holds what training changed, and the pretrained folder the config names must be
    present to load it, as for a checkpoint. Their non-tensor state (the digest of those
    pretrained weights, SD's class names and adapters) is kept as JSON in the metadata.
    """
    from safetensors.torch import save

    folder = Path(folder)
    tensors = {
        k: v.detach().cpu().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)
    }
    extra = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    metadata = {
        "format": EXPORT_FORMAT,
        "global_step": str(int(meta.get("global_step", 0))),
        "code_version": str(meta.get("code_version", "")),
        "dataset": json.dumps(meta.get("dataset", {})),
        "extra_state": json.dumps(extra),
    }
    atomic_write_bytes(folder / EXPORT_WEIGHTS, save(tensors, metadata=metadata))
    atomic_write_text(folder / EXPORT_CONFIG, OmegaConf.to_yaml(OmegaConf.create(meta["config"])))
    return folder


def find_resume_checkpoint(ckpt_dir: Path, cfg: DictConfig) -> Path | None:
    """The run directory's last checkpoint, validated, or None for a fresh run."""
    last = ckpt_dir / LAST
    if not last.exists():
        return None
    ckpt = read_checkpoint(last)
    check_compatible(ckpt, cfg, last)
    return last
