"""A trained run, loaded: its model rebuilt from the checkpoint's own config with its (EMA)
weights, and what rebuilds the rest of it (schedule, data); the one loader that sampling,
evaluation, the analyses, the classifier's augmentation and a distillation teacher start from.
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
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from lt_diffusion.diffusion import generate
from lt_diffusion.runs.build import (
    build_datamodule,
    build_model,
    build_objective,
    build_sampler,
    build_schedule,
    check_guidance,
    check_sampler,
    resolve_sampler,
)
from lt_diffusion.runs.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS,
    META_KEY,
    CheckpointError,
    model_state,
    read_checkpoint,
)


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
    model = build_model(OmegaConf.create(config))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {source} do not fit the model its config describes: {str(err)[:300]}"
        ) from err
    return model


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
        return build_schedule(self.train_cfg).to(self.device)

    @cached_property
    def objective(self) -> Any:
        """The objective the run was trained with (what its output means, its label dropout)."""
        return build_objective(self.train_cfg)

    def datamodule(self, data_root: str | Path | None = None) -> Any:
        return run_datamodule(self.train_cfg, data_root)


def run_datamodule(train_cfg: DictConfig, data_root: str | Path | None = None) -> Any:
    """A trained run's long-tailed data, set up; ``data_root``: the datasets' folder now, when
    it is not where the run was trained (the dataset's own folder name is kept). A root given
    must hold that folder, and only its files are read: no system-wide copy stands in for
    them (the source's ``location`` says which folder was read)."""
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


def sample_labels(
    run_: LoadedRun,
    labels: Tensor,
    sampler_cfg: DictConfig,
    guidance: float | None,
    seed: int,
    batch_size: int = 256,
) -> tuple[Tensor, dict[str, Any]]:
    """uint8 images of ``labels`` from a loaded run's model, deterministically from ``seed``
    (``guidance`` None: the run's own), and what made them (checkpoint, step, the resolved
    sampler, guidance, seed) for the folder's ``meta.json``."""
    model, meta, train_cfg = run_.model, run_.meta, run_.train_cfg
    guidance = float(train_cfg.sampler.guidance if guidance is None else guidance)
    check_guidance(train_cfg, guidance, str(meta["checkpoint"]), setting="guidance")
    node = resolve_sampler(sampler_cfg, model)
    check_sampler(train_cfg, node, str(meta["checkpoint"]), setting="sampler")
    images = generate(
        model,
        build_sampler(node, run_.schedule),
        labels,
        seed=seed,
        batch_size=batch_size,
        image_shape=(model.in_channels, model.image_size, model.image_size),
        guidance=guidance,
        device=run_.device,
        progress=True,
    )
    info = {
        "checkpoint": meta["checkpoint"],
        "global_step": meta["global_step"],
        "sampler": OmegaConf.to_container(node, resolve=True),
        "guidance": guidance,
        "seed": int(seed),
    }
    return images, info


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run a run directory logged to (Lightning's ``WandbLogger``
    writes ``<run_dir>/wandb/latest-run`` -> ``offline-run-<time>-<id>``), or None."""
    latest = run_dir / "wandb" / "latest-run"
    if not latest.exists():
        return None
    return latest.resolve().name.rsplit("-", 1)[-1]
