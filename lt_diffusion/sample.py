"""Write N images per class from a checkpoint's EMA model, deterministically from a seed:
``python -m lt_diffusion.sample checkpoint=.../last.ckpt n_per_class=100 seed=0``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lt_diffusion.diffusion import balanced_labels
from lt_diffusion.runs.build import sampler_label
from lt_diffusion.runs.load import load_run, sample_labels
from lt_diffusion.utils.command import hydra_command
from lt_diffusion.utils.imagefolder import write_image_folder


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


main = hydra_command("sample", run)

if __name__ == "__main__":
    main()
