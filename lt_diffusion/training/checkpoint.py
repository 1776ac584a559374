"""Checkpoints: atomic writes, validation before use, loading a model for sampling, and the
safetensors export of the EMA weights.

A Lightning checkpoint of this project carries an ``lt_diffusion`` entry with the resolved
config and the dataset description, so a checkpoint alone is enough to rebuild its model.
The export (``<run_dir>/export/``) is the same EMA model without pickles: ``ema.safetensors``
and the resolved ``config.yaml`` beside it (:func:`export_ema`, :func:`load_exported`).
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

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


def config_differences(saved: dict | DictConfig, current: dict | DictConfig) -> list[str]:
    """The settings that define a run's weights (:func:`training_settings`) on which two
    configs disagree, as readable lines (budget and hardware may differ: a resume)."""
    a, b = (_flatten(training_settings(c)) for c in (saved, current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUMABLE_CHANGES) or a.get(key) == b.get(key):
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


def load_sampling_model(
    path: str | Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's model from its own config and load its (EMA) weights.

    Returns the model in eval mode and the checkpoint's metadata (config, dataset, step).
    """
    ckpt = read_checkpoint(path)
    meta = dict(ckpt[META_KEY])
    meta["global_step"] = int(ckpt.get("global_step", 0))
    meta["checkpoint"] = str(Path(path).resolve())
    model = _rebuild(meta["config"], model_state(ckpt, ema=ema), path)
    return model.to(device).eval().requires_grad_(False), meta


def _rebuild(config: Any, state: dict[str, Any], source: str | Path) -> nn.Module:
    """The model ``config`` describes (its method's transform included), holding ``state``."""
    from lt_diffusion.training.builders import build_model

    model = build_model(OmegaConf.create(config))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {source} do not fit the model its config describes: {str(err)[:300]}"
        ) from err
    return model


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


def load_exported(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model (:func:`export_ema`) from ``config.yaml`` and load
    ``ema.safetensors`` (no pickle is read). Returns the model in eval mode and the metadata
    (config, dataset, global_step, code_version), as :func:`load_sampling_model` does.

    ``config.yaml`` may be edited where paths differ on this machine (``model.pretrained``).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    weights, config = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    missing = [p.name for p in (weights, config) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not an export: {' and '.join(missing)} missing. A finished training "
            "writes <run_dir>/export/ (train.export=true)."
        )
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            info = f.metadata() or {}
            names = f.keys()  # a safetensors handle: not iterable like a dict
            state: dict[str, Any] = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from err
    if info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{weights} is not an lt-diffusion export (metadata format {info.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r})"
        )
    state.update(json.loads(info["extra_state"]))
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    meta = {
        "config": cfg,
        "dataset": json.loads(info["dataset"]),
        "global_step": int(info["global_step"]),
        "code_version": info["code_version"],
    }
    model = _rebuild(cfg, state, weights)
    return model.to(device).eval().requires_grad_(False), meta


@dataclass
class LoadedRun:
    """A checkpoint's model (EMA weights unless ``ema=False``) with what rebuilds the rest of
    its run: the one loader that sample, evaluate and the analyses start from."""

    model: nn.Module
    meta: dict[str, Any]  # the checkpoint's metadata: config, dataset, checkpoint, global_step
    device: torch.device
    ema: bool = True
    theta_g_only: bool = False

    @cached_property
    def train_cfg(self) -> DictConfig:
        return OmegaConf.create(self.meta["config"])

    @property
    def run_dir(self) -> Path:
        """``<run_dir>`` of ``<run_dir>/checkpoints/<file>.ckpt``."""
        return Path(self.meta["checkpoint"]).resolve().parent.parent

    @cached_property
    def schedule(self) -> Any:
        from lt_diffusion.training.builders import build_schedule

        return build_schedule(self.train_cfg).to(self.device)

    def datamodule(self, data_root: str | Path | None = None) -> Any:
        return run_datamodule(self.train_cfg, data_root)


def run_datamodule(train_cfg: DictConfig, data_root: str | Path | None = None) -> Any:
    """A trained run's long-tailed data, set up; ``data_root``: the datasets' folder now, when
    it is not where the run was trained (the dataset's own folder name is kept). A root given
    must hold that folder, and only its files are read: no system-wide copy stands in for
    them (the source's ``location`` says which folder was read)."""
    from lt_diffusion.training.builders import build_datamodule

    if data_root and "root" in train_cfg.dataset.source:  # generated data have no root
        train_cfg = copy.deepcopy(train_cfg)
        source = train_cfg.dataset.source
        folder = Path(data_root) / Path(source.root).name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data_root={data_root} has no {folder.name}/ folder: the run's dataset "
                f"({train_cfg.dataset.name}) is expected in {folder} (it was trained on "
                f"{source.root}). Point data_root at the folder that holds {folder.name}/, or "
                "leave data_root unset to read the data where the run was trained."
            )
        source.root = str(folder)
        if "system_copy" in inspect.signature(get_class(source._target_)).parameters:
            with open_dict(source):
                source.system_copy = False
        train_cfg.data.source = source
    datamodule = build_datamodule(train_cfg)
    datamodule.setup()
    return datamodule


def load_run(
    checkpoint: str | Path | None,
    device: str | torch.device = "auto",
    ema: bool = True,
    theta_g_only: bool = False,
) -> LoadedRun:
    """Rebuild a checkpoint's model on ``device`` (``auto``: the GPU when there is one);
    ``theta_g_only`` switches a CM model's reserved low-rank capacity off (refused when it
    has none)."""
    from lt_diffusion.models.lowrank import set_expert_enabled
    from lt_diffusion.runtime import resolve_device

    if not checkpoint:
        raise ValueError("give checkpoint=<run_dir>/checkpoints/last.ckpt")
    dev = resolve_device(device)
    model, meta = load_sampling_model(checkpoint, dev, ema=bool(ema))
    if theta_g_only and set_expert_enabled(model, False) == 0:
        raise ValueError(
            f"theta_g_only=true but {checkpoint} has no reserved low-rank capacity (method "
            f"{meta['config']['method']['name']}): it applies to CM checkpoints only"
        )
    return LoadedRun(model, meta, dev, bool(ema), bool(theta_g_only))


def find_resume_checkpoint(ckpt_dir: Path, cfg: DictConfig) -> Path | None:
    """The run directory's last checkpoint, validated, or None for a fresh run."""
    last = ckpt_dir / LAST
    if not last.exists():
        return None
    ckpt = read_checkpoint(last)
    check_compatible(ckpt, cfg, last)
    return last
