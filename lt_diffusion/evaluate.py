"""Evaluate a checkpoint (EMA weights) or a folder of generated images under a protocol and
write one record: ``python -m lt_diffusion.evaluate checkpoint=... eval=cm_paper``.

Under torchrun (``torchrun --nproc_per_node N -m lt_diffusion.evaluate ...``) generation and
feature extraction are split across the processes; the record is the same as with one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.evaluation.distributed import init_from_env, world
from lt_diffusion.evaluation.evaluator import build_record, run_protocol, save_record
from lt_diffusion.evaluation.plots import plot_fid_vs_count
from lt_diffusion.evaluation.record import record_filename
from lt_diffusion.sample import resolve_device
from lt_diffusion.train import CONFIG_DIR, code_version
from lt_diffusion.training.builders import build_datamodule, build_sampler, build_schedule
from lt_diffusion.training.checkpoint import (
    META_KEY,
    CheckpointError,
    load_sampling_model,
    read_checkpoint,
)
from lt_diffusion.utils.imagefolder import read_image_folder


def check_dataset(cfg: DictConfig, train_cfg: DictConfig, source: str) -> None:
    """When the user names a dataset, the checkpoint must be of it, at its resolution."""
    if cfg.get("dataset") is None:
        return
    want, have = cfg.dataset, train_cfg.dataset
    for key in ("name", "image_size", "channels", "num_classes"):
        if want[key] != have[key]:
            raise CheckpointError(
                f"{source} is of dataset {have.name} at {have.image_size}px "
                f"({have.channels} channels, {have.num_classes} classes), not {want.name} at "
                f"{want.image_size}px: evaluate it against its own dataset, or pick the "
                "matching checkpoint"
            )


def record_path(cfg: DictConfig, run_dir: Path, guidance: float) -> Path:
    if cfg.record:
        return Path(cfg.record)
    name = record_filename(cfg.eval.name, cfg.sampler.name, guidance, bool(cfg.theta_g_only))
    return run_dir / "records" / name


def print_table(record: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = record["metrics"]
    rows = [("overall", m["overall"])] if m["overall"] else []
    rows += list(m["per_split"].items()) + list(m["per_class"].items())
    names = record["dataset"]["class_names"]
    table = Table(title=f"{record['dataset']['name']} - protocol {record['protocol']['name']}")
    cols = ("fid", "kid", "precision", "recall", "is")
    for col in ("", *cols, "generated", "real"):
        table.add_column(col, justify="right")

    def fmt(v: Any, col: str) -> str:
        if v is None:
            return "n/a"
        return f"{v:.4f}" if col == "kid" else f"{v:.3f}" if col != "fid" else f"{v:.2f}"

    for name, v in rows:
        label = names[int(name[6:])] if name.startswith("class_") else name
        table.add_row(
            label, *[fmt(v.get(c), c) if c in v else "-" for c in cols],
            str(v["n_generated"]), str(v["n_real"]),
        )  # fmt: skip
    Console(width=120).print(table)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Evaluate; returns the record on rank 0 (None on other ranks)."""
    if bool(cfg.checkpoint) == bool(cfg.images):
        raise ValueError("give exactly one of checkpoint=<.ckpt> or images=<folder>")
    joined = init_from_env()
    try:
        return _run(cfg)
    finally:
        if joined:
            dist.destroy_process_group()


def _run(cfg: DictConfig) -> dict[str, Any] | None:
    rank, _ = world()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    model = folder = None
    if cfg.checkpoint:
        model, meta = load_sampling_model(cfg.checkpoint, device)
        source = str(cfg.checkpoint)
    else:
        images, labels, fmeta = read_image_folder(cfg.images)
        if "checkpoint" not in fmeta:
            raise ValueError(f"{cfg.images}/meta.json names no checkpoint: cannot tell its dataset")
        ckpt = read_checkpoint(fmeta["checkpoint"])
        meta = {
            **ckpt[META_KEY],
            "checkpoint": fmeta["checkpoint"],
            "global_step": ckpt["global_step"],
        }
        folder, source = (images, labels), str(cfg.images)
    train_cfg = OmegaConf.create(meta["config"])
    check_dataset(cfg, train_cfg, source)
    if cfg.data_root:
        root = Path(train_cfg.dataset.source.root)
        train_cfg.dataset.source.root = str(Path(cfg.data_root) / root.name)
        train_cfg.data.source = train_cfg.dataset.source
    datamodule = build_datamodule(train_cfg)
    datamodule.setup()
    info = datamodule.info()
    if folder is not None and tuple(folder[0].shape[1:]) != (
        info["channels"],
        info["image_size"],
        info["image_size"],
    ):
        raise ValueError(
            f"images in {cfg.images} are {tuple(folder[0].shape[1:])}, the dataset is "
            f"{info['channels']}x{info['image_size']}x{info['image_size']}"
        )
    guidance = float(train_cfg.sampler.guidance if cfg.guidance is None else cfg.guidance)
    sampler = None
    if model is not None:
        if cfg.theta_g_only:
            from lt_diffusion.methods.lora import set_expert_enabled

            set_expert_enabled(model, False)
        sampler = build_sampler(cfg.sampler, build_schedule(train_cfg).to(device))
    result = run_protocol(
        protocol=cfg.eval,
        dataset_info=info,
        datamodule=datamodule,
        cache_dir=Path(cfg.paths.cache_dir),
        device=device,
        model=model,
        sampler=sampler,
        guidance=guidance,
        folder=folder,
    )
    if rank != 0:
        return None
    record = build_record(
        result=result,
        config=OmegaConf.to_container(train_cfg, resolve=True),
        dataset_info=info,
        checkpoint={"path": meta["checkpoint"], "step": meta["global_step"],
                    "theta_g_only": bool(cfg.theta_g_only), "images": cfg.images},
        sampler={**OmegaConf.to_container(cfg.sampler, resolve=True), "guidance": guidance},
        code_version=code_version(),
    )  # fmt: skip
    run_dir = Path(meta["checkpoint"]).resolve().parent.parent
    path = save_record(record_path(cfg, run_dir, guidance), record)
    plot = plot_fid_vs_count(record, path.with_suffix(".png"))
    print_table(record)
    print(f"Record: {path}" + (f"\nPlot: {plot}" if plot else ""))
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
