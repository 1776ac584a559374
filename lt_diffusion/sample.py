"""Write N images per class from a checkpoint's EMA model, deterministically from a seed:
``python -m lt_diffusion.sample checkpoint=.../last.ckpt n_per_class=100 seed=0``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lt_diffusion.diffusion import balanced_labels, generate
from lt_diffusion.runtime import CONFIG_DIR
from lt_diffusion.training.builders import (
    build_sampler,
    check_guidance,
    check_sampler,
    resolve_sampler,
    sampler_label,
)
from lt_diffusion.training.checkpoint import LoadedRun, load_run
from lt_diffusion.utils.imagefolder import write_image_folder


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


def run(cfg: DictConfig) -> Path:
    """Sample ``cfg.n_per_class`` images of every class; returns the output folder."""
    if cfg.n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {cfg.n_per_class}")
    run_ = load_run(cfg.checkpoint, cfg.device)
    guidance = float(run_.train_cfg.sampler.guidance if cfg.guidance is None else cfg.guidance)
    out = cfg.out_dir or (
        Path(cfg.checkpoint).resolve().parent.parent
        / "samples"
        / f"{sampler_label(cfg.sampler)}-w{guidance:g}-seed{cfg.seed}-n{cfg.n_per_class}"
    )
    if Path(out).exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists: pass out_dir=... or overwrite=true")
    labels = balanced_labels(run_.model.num_classes, cfg.n_per_class)
    images, info = sample_labels(run_, labels, cfg.sampler, guidance, cfg.seed, cfg.batch_size)
    info["n_per_class"] = int(cfg.n_per_class)
    class_names = run_.meta["dataset"]["class_names"]
    folder = write_image_folder(out, images, labels, class_names, info, overwrite=cfg.overwrite)
    print(f"Wrote {len(labels)} images ({cfg.n_per_class} per class) to {folder}")
    return folder


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
