"""One evaluation, as ``python -m lt_diffusion.evaluate`` (and a table's jobs) run it: a
checkpoint (EMA weights, generating with the protocol's sampler) or a folder of generated
images, compared with the real images under a protocol, into one record (docs/evaluation.md).

Under torchrun generation and feature extraction are split across the processes; the record is
the same as with one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.diffusion.generate import is_vector_model
from lt_diffusion.evaluation.distributed import init_from_env, world
from lt_diffusion.evaluation.evaluator import run_protocol
from lt_diffusion.evaluation.identity import evaluation_identity
from lt_diffusion.evaluation.metrics import METRICS
from lt_diffusion.evaluation.plots import plot_fid_vs_count
from lt_diffusion.evaluation.protocol import protocol_sampler
from lt_diffusion.evaluation.record import conventions, record_filename
from lt_diffusion.evaluation.repeats import merge_repeats, noise_seeds
from lt_diffusion.evaluation.toy import run_toy_protocol
from lt_diffusion.evaluation.tracking import log_to_training_run
from lt_diffusion.records.base import build_record, write_record
from lt_diffusion.runs.build import (
    build_sampler,
    build_schedule,
    check_guidance,
    check_sampler,
    resolve_sampler,
)
from lt_diffusion.runs.checkpoint import META_KEY, CheckpointError, read_checkpoint
from lt_diffusion.runs.load import load_run, run_datamodule
from lt_diffusion.runtime import code_version, resolve_device
from lt_diffusion.utils.imagefolder import read_folder_meta, read_image_folder


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


def _cell(entry: dict[str, Any], metric: Any) -> str:
    """A metric's value as the terminal shows it: KID with its std, FID of a small comparison
    marked biased (*), n/a without a number."""
    if metric.name not in entry:
        return "-"
    value = entry[metric.name]
    if value is None:
        return "n/a"
    text = f"{value:.{metric.digits}f}"
    if metric.name == "kid" and entry.get("kid_std") is not None:
        text += f" ± {entry['kid_std']:.{metric.digits}f}"
    if entry.get("small_sample") and metric.real == "statistics":
        text += "*"
    return text


def table_caption(record: dict[str, Any]) -> list[str]:
    """The lines under the terminal table: the reference compared with, and what a small
    comparison's numbers mean."""
    ref = record["reference"]
    where = f"{ref['path']}: " if ref.get("origin") == "file" else ""
    lines = [f"Reference: {where}{ref['description']}."]
    m = record["metrics"]
    entries = [m["overall"], *m["per_split"].values(), *m["per_class"].values()]
    small = [e for e in entries if e and e.get("small_sample")]
    if small:
        smallest = min(min(e["n_generated"], e["n_real"] or e["n_generated"]) for e in small)
        fid_dim = record["extractors"].get("inception", {}).get("dim", 2048)
        lines.append(
            f"* {len(small)} of {len(entries)} comparisons have fewer than {fid_dim} images on a "
            f"side (down to {smallest}): FID is biased upwards there and its value depends on "
            "n; read KID ± std (unbiased; std over subsets). Numbers of protocol "
            f"'{record['protocol']['name']}' compare only with numbers of the same protocol, "
            "never with papers' (50,000 images)."
        )
    return lines


def print_table(record: dict[str, Any]) -> None:
    """The record's comparisons as a terminal table: one column per metric the protocol
    computed (labels and digits from the metric registry; KID first, with its std, when the
    comparisons are small), then the reference and what small comparisons mean."""
    from rich.console import Console
    from rich.table import Table

    m = record["metrics"]
    rows = [("overall", m["overall"])] if m["overall"] else []
    rows += list(m["per_split"].items()) + list(m["per_class"].items())
    names = record["dataset"]["class_names"]
    table = Table(title=f"{record['dataset']['name']} - protocol {record['protocol']['name']}")
    spaces = record["protocol"].get("features") or {}
    shown = [c for c in record["protocol"].get("metrics", METRICS) if c in METRICS]
    if any(v.get("kid") is not None for _, v in rows) and "kid" not in shown:
        shown.append("kid")  # computed for the small comparisons
    if any(v.get("primary") == "kid" for _, v in rows):
        shown.sort(key=lambda c: c != "kid")
    cols = [METRICS[c] for c in shown]
    labels = [
        c.label
        + (
            f" ({spaces[c.name]})"
            if not c.fixed_space and spaces.get(c.name, c.features) != c.features
            else ""
        )
        + (" ± std" if c.name == "kid" else "")
        for c in cols
    ]
    for label in ("", *labels, "generated", "real"):
        table.add_column(label, justify="right")
    for name, v in rows:
        label = names[int(name[6:])] if name.startswith("class_") else name
        n_real = "?" if v["n_real"] is None else str(v["n_real"])
        table.add_row(label, *(_cell(v, c) for c in cols), str(v["n_generated"]), n_real)
    console = Console(width=120)
    console.print(table)
    for line in table_caption(record):
        console.print(line, highlight=False, soft_wrap=True)


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


@dataclass
class Evaluated:
    """What one evaluation compares with the real images: a model with the sampler the protocol
    names, or a folder of images with the provenance its ``meta.json`` states."""

    meta: dict[str, Any]  # the training checkpoint's metadata (config, dataset, step, path)
    model: torch.nn.Module | None = None
    sampler: dict[str, Any] | None = None  # the sampler node that runs (model) or ran (folder)
    requested: dict[str, Any] | None = None  # the protocol's sampler node before auto settings
    guidance: float | None = None
    folder: tuple[torch.Tensor, torch.Tensor] | None = None
    images: dict[str, Any] | None = None  # a folder's provenance (identity of the images)

    @property
    def train_cfg(self) -> DictConfig:
        return OmegaConf.create(self.meta["config"])


def from_checkpoint(cfg: DictConfig, device: torch.device) -> Evaluated:
    """The model of ``cfg.checkpoint`` and the sampler / guidance of the protocol, checked."""
    run = load_run(cfg.checkpoint, device, theta_g_only=bool(cfg.theta_g_only))
    check_dataset(cfg, run.train_cfg, str(cfg.checkpoint))
    guidance = cfg.eval.get("guidance")
    guidance = float(run.train_cfg.sampler.guidance if guidance is None else guidance)
    check_guidance(run.train_cfg, guidance, str(cfg.checkpoint))
    node = protocol_sampler(cfg.eval)
    check_sampler(run.train_cfg, node, str(cfg.checkpoint), setting="eval.sampler")
    return Evaluated(
        run.meta,
        run.model,
        sampler=OmegaConf.to_container(resolve_sampler(node, run.model), resolve=True),
        requested=OmegaConf.to_container(node, resolve=True),
        guidance=guidance,
    )


def from_folder(cfg: DictConfig) -> Evaluated:
    """The images of ``cfg.images`` with their own sampler, guidance and seed (meta.json)."""
    if cfg.theta_g_only:
        raise ValueError(
            "theta_g_only applies when evaluate generates from a checkpoint; an image folder "
            "was generated already (lt_diffusion.sample writes what it sampled with)"
        )
    fmeta = read_folder_meta(cfg.images)
    if "checkpoint" not in fmeta:
        raise ValueError(f"{cfg.images}/meta.json names no checkpoint: cannot tell its dataset")
    ckpt = read_checkpoint(fmeta["checkpoint"])
    channels = int(ckpt[META_KEY]["config"]["dataset"]["channels"])
    images, labels, _ = read_image_folder(cfg.images, channels=channels)
    meta = {**ckpt[META_KEY], "checkpoint": fmeta["checkpoint"], "global_step": ckpt["global_step"]}
    check_dataset(cfg, OmegaConf.create(meta["config"]), str(cfg.images))
    provenance = {
        "folder": str(Path(cfg.images).resolve()),
        "sha256": images_digest(images, labels),
        **{k: fmeta[k] for k in ("global_step", "seed", "n_per_class") if k in fmeta},
    }
    guidance = fmeta.get("guidance")
    return Evaluated(
        meta,
        sampler=fmeta.get("sampler"),
        guidance=None if guidance is None else float(guidance),
        folder=(images, labels),
        images=provenance,
    )


def images_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of a folder's decoded pixels and labels: the images' identity, wherever they
    are and however their PNG files were encoded."""
    h = hashlib.sha256()
    h.update(labels.numpy().tobytes())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def record_path(cfg: DictConfig, ev: Evaluated, identity: dict[str, Any]) -> Path:
    """``record=`` when given, else ``<run_dir>/records/<name>`` named by the settings."""
    if cfg.record:
        return Path(cfg.record)
    label = "images" if ev.images is not None else str(ev.sampler["name"])  # type: ignore[index]
    name = record_filename(
        str(cfg.eval.name), label, ev.guidance, bool(cfg.theta_g_only), identity["digest"]
    )
    return Path(ev.meta["checkpoint"]).resolve().parent.parent / "records" / name


def _run(cfg: DictConfig) -> dict[str, Any] | None:
    rank, size = world()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    repeats = int(cfg.eval.get("repeats", 1))
    if repeats != 1 and not cfg.checkpoint:
        raise ValueError(
            f"eval.repeats={repeats} draws new generation sets from a checkpoint; a folder of "
            "images is one set: evaluate it with eval.repeats=1, or give checkpoint=<.ckpt>"
        )
    noise_seeds(int(cfg.eval.seed), repeats)  # refuses a count below 1 before any work
    ev = from_checkpoint(cfg, device) if cfg.checkpoint else from_folder(cfg)
    train_cfg = ev.train_cfg
    identity = evaluation_identity(
        train_config=train_cfg,
        protocol=cfg.eval,
        sampler=ev.requested,
        guidance=ev.guidance,
        theta_g_only=bool(cfg.theta_g_only),
        images=ev.images,
    )
    datamodule = run_datamodule(train_cfg, cfg.data_root)
    info = datamodule.info()
    want = (info["channels"], info["image_size"], info["image_size"])
    if ev.folder is not None and tuple(ev.folder[0].shape[1:]) != want:
        raise ValueError(
            f"images in {cfg.images} are {tuple(ev.folder[0].shape[1:])}, the dataset is "
            f"{want[0]}x{want[1]}x{want[2]}"
        )
    sampler = None
    if ev.model is not None:
        sampler = build_sampler(OmegaConf.create(ev.sampler), build_schedule(train_cfg).to(device))
    # Models of points (the synthetic benchmark) get its exact metrics, in the same record.
    protocol_fn = run_toy_protocol if is_vector_model(ev.model) else run_protocol
    seeds = noise_seeds(int(cfg.eval.seed), int(cfg.eval.get("repeats", 1)))
    results = [
        protocol_fn(
            protocol=cfg.eval,
            dataset_info=info,
            datamodule=datamodule,
            cache_dir=Path(cfg.paths.cache_dir),
            device=device,
            model=ev.model,
            sampler=sampler,
            guidance=ev.guidance or 0.0,
            folder=ev.folder,
            noise_seed=seed,
        )
        for seed in seeds
    ]
    if rank != 0:
        return None
    result = results[0] if len(results) == 1 else merge_repeats(results, seeds)
    location = getattr(datamodule.source, "location", None)  # None: generated data
    record = build_record(
        config=OmegaConf.to_container(train_cfg, resolve=True),
        dataset={**info, "root": None if location is None else str(Path(location).resolve())},
        checkpoint={"path": ev.meta["checkpoint"], "step": ev.meta["global_step"],
                    "theta_g_only": bool(cfg.theta_g_only), "images": ev.images},
        sampler={**(ev.sampler or {}), "guidance": ev.guidance},
        conventions=conventions(ev.guidance),
        identity=identity,
        code_version=code_version(),
        **result,
    )  # fmt: skip
    print_table(record)  # the results reach the user before anything can fail on disk
    path = record_path(cfg, ev, identity)
    try:
        write_record(path, record)
    except OSError as err:
        print(json.dumps(record, indent=1, allow_nan=False))
        raise RecordSaveError(
            f"could not write the record to {path} ({err.strerror or err}); any previous file "
            "there is untouched. The results are printed above (the table, then the whole "
            "record as JSON): free space or fix the permissions and run the evaluation again, "
            "or pass record=<another path>"
        ) from err
    try:
        plot = plot_fid_vs_count(record, path.with_suffix(".png"))
    except OSError as err:  # the record is safe; the picture can be drawn again from it
        plot = None
        print(f"The plot was not written ({err.strerror or err}); the record is complete.")
    print(f"Record: {path}" + (f"\nPlot: {plot}" if plot else ""))
    if cfg.get("track", True) and ev.images is None:
        track(path.parent.parent, train_cfg.get("logger"), path.stem, record, plot)
    return record


def track(run_dir: Path, logger: Any, name: str, record: dict[str, Any], plot: Path | None) -> None:
    """The results in the training run's wandb run; a failure there costs only that entry."""
    try:
        run_id = log_to_training_run(run_dir, logger, name, record, plot)
    except Exception as err:  # noqa: BLE001 - the record is saved; tracking is a copy of it
        print(f"The results were not added to the run's wandb run ({err}); the record is complete.")
        return
    if run_id is not None:
        print(f"wandb: added to run {run_id} (eval/{name}/...)")


class RecordSaveError(OSError):
    """The evaluation finished but its record could not be written."""
