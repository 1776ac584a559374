"""One classification run, as ``python -m lt_diffusion.classify`` (and a table's jobs) run it:
train the classifier (resuming it), then evaluate it on the test split into one record.

Order of work: the config's checks (unknown keys, schedule, augmentation settings, the
generator's composition), the data files, the resume checkpoint; then the long parts: the
generator run (trained or resumed through ``lt_diffusion.train`` when the augmentation names
one), its images (generated once, cached), the classifier's training, the test evaluation.
As a diffusion run, the run directory comes from the config (``<output_dir>/runs/<run_name>``),
holds ``train.lock`` while it trains, ``checkpoints/last.ckpt`` (atomic writes, exact resume:
the batch stream and the crops are functions of the step) and ``records/``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from lt_diffusion.classification.augment import generated_images, generated_per_class
from lt_diffusion.classification.config import (
    check_config,
    classification_identity,
    classification_record_filename,
    generator_config,
)
from lt_diffusion.classification.data import ClassificationData
from lt_diffusion.classification.losses import ClassificationLoss
from lt_diffusion.classification.metrics import classification_metrics, summary_line
from lt_diffusion.classification.module import ClassifierModule, EpochSchedule
from lt_diffusion.classification.record import KIND
from lt_diffusion.records.base import build_record, write_record
from lt_diffusion.runs.build import instantiate as checked_instantiate
from lt_diffusion.runs.checkpoint import (
    LAST,
    META_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    find_resume_checkpoint,
    read_checkpoint,
)
from lt_diffusion.runtime import code_version
from lt_diffusion.training.callbacks import RunCheckpoint, RunLockGuard
from lt_diffusion.training.run import (
    NOT_SWEPT,
    build_logger,
    cluster_plugins,
    fit,
    launch_rank,
    launch_record,
    on_gpu,
    process_seed,
)
from lt_diffusion.utils.io import atomic_write_text, remove_temporaries_below
from lt_diffusion.utils.runlock import hold_run_lock
from lt_diffusion.utils.threads import torch_threads


def build_classifier(cfg: DictConfig) -> nn.Module:
    """The classifier, then the capacity transform (CM's low-rank split) when configured."""
    model = checked_instantiate(cfg.classifier.model)
    transform = cfg.capacity.get("transform")
    if transform is not None:
        model = checked_instantiate(transform)(model)
    return model


def load_classifier(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A classification checkpoint's model in eval mode, and the checkpoint's metadata."""
    ckpt = read_checkpoint(checkpoint)
    meta = dict(ckpt[META_KEY])
    if meta.get("config", {}).get("task") != "classify":
        raise CheckpointError(
            f"{checkpoint} is not a classifier's checkpoint (lt_diffusion.classify)"
        )
    model = build_classifier(OmegaConf.create(meta["config"]))
    state = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {checkpoint} do not fit the classifier its config describes: {str(err)[:300]}"
        ) from err
    meta["global_step"] = int(ckpt.get("global_step", 0))
    return model.to(device).eval(), meta


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    loss: ClassificationLoss,
    device: torch.device,
    batch_size: int = 512,
) -> Tensor:
    """Top-1 predictions (int64, CPU) of uint8 ``images``, after the loss's post-hoc adjustment."""
    model = model.to(device).eval()
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device).float().div_(127.5).sub_(1.0)
        logits = loss.prediction_logits(model(x).double().cpu())
        out.append(logits.argmax(1))
    return torch.cat(out)


def _augment(cfg: DictConfig, data: ClassificationData) -> dict[str, Any] | None:
    """Train (or resume) the generator run, generate or read its images, add them; returns what
    the record says of them (None without augmentation)."""
    aug = cfg.augment
    if aug.rule == "none":
        return None
    per_class = generated_per_class(aug.rule, list(data.base.class_counts), aug.get("total"))
    gen_cfg = generator_config(cfg)
    generator: dict[str, Any] = {"checkpoint": aug.checkpoint}
    if gen_cfg is not None:
        from lt_diffusion.training import run as train

        rank_zero_info(f"Generator run: {gen_cfg.paths.run_dir} (trained or resumed first)")
        train.run(gen_cfg)
        checkpoint = Path(gen_cfg.paths.run_dir) / "checkpoints" / LAST
        generator = {
            "experiment": aug.generator.experiment,
            "seed": int(aug.generator.seed),
            "overrides": list(aug.generator.overrides),
            "run_dir": str(gen_cfg.paths.run_dir),
        }
    else:
        checkpoint = Path(aug.checkpoint)
    device = aug.device
    gen = generated_images(
        checkpoint,
        per_class,
        data.base.class_names,
        aug.sampler,
        aug.guidance,
        int(aug.seed),
        device=device,
        batch_size=int(aug.batch_size),
    )
    data.add_generated(gen.images, gen.labels)
    rank_zero_info(f"Added {len(gen.labels)} generated images from {gen.provenance['folder']}")
    return {"rule": aug.rule, "total": aug.get("total"), "generator": generator, **gen.provenance}


def steps_per_epoch(n_images: int, batch_size: int, world_size: int) -> int:
    """Steps that show every training image once: ``ceil(N / (batch size x processes))``."""
    return max(1, math.ceil(n_images / (batch_size * world_size)))


def run(
    cfg: DictConfig, record: str | Path | None = None, launch_files: bool = False
) -> dict[str, Any] | None:
    """Train the classification run ``cfg`` describes, then evaluate it on the test split and
    write its record (to ``record``, default ``<run_dir>/records/classify-test-<digest>.json``).
    Returns the record (None on the ranks other than 0 of a distributed run). ``launch_files``:
    the classify command's Hydra launch record, written under the run's lock
    (:func:`lt_diffusion.training.run.launch_record`)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls where the GPU has them
    check_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    identity = classification_identity(cfg)
    record_path = (
        Path(record)
        if record
        else run_dir / "records" / classification_record_filename(identity["digest"])
    )
    loss: ClassificationLoss = checked_instantiate(cfg.loss.fn)  # its settings' checks
    on_device = cfg.data.on_device
    base = checked_instantiate(
        cfg.data, on_device=on_gpu(cfg) if on_device == "auto" else on_device
    )
    data = ClassificationData(base, int(cfg.train.crop_padding))
    ckpt_dir = run_dir / "checkpoints"
    with (
        hold_run_lock(run_dir, enabled=launch_rank() == 0) as lock,
        launch_record(run_dir, cfg, enabled=launch_files and lock is not None),
        torch_threads(cfg.train.get("threads"), "train.threads"),
    ):
        if lock is not None:
            for tmp in remove_temporaries_below(run_dir, skip=NOT_SWEPT):
                rank_zero_info(f"Removed {tmp}, a write that was killed mid-way")
        data.prepare()  # the data files, before anything long
        resume = find_resume_checkpoint(ckpt_dir, cfg)
        if resume is not None and not cfg.train.resume:
            raise CheckpointError(
                f"{resume} exists and train.resume=false: refusing to overwrite it. Delete the "
                "run directory, choose another tag / seed, or set train.resume=true."
            )
        started = time.time()
        augmentation = _augment(cfg, data)
        counts = data.class_counts
        loss.setup(counts)
        world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
        per_epoch = steps_per_epoch(len(data.labels), int(cfg.data.batch_size), world)
        total = int(cfg.train.max_steps or int(cfg.train.epochs) * per_epoch)
        done = int(read_checkpoint(resume).get("global_step", 0)) if resume is not None else 0
        if done < total:
            _fit(cfg, data, loss, counts, per_epoch, total, resume, done, lock)
        else:
            rank_zero_info(f"Run already complete at step {done}: {resume}")
        trained = time.time() - started
    if rank_zero_only.rank != 0:
        return None
    return _evaluate(
        cfg,
        data,
        loss,
        ckpt_dir / LAST,
        record_path,
        identity,
        augmentation,
        total,
        per_epoch,
        trained,
    )


def _fit(
    cfg: DictConfig,
    data: ClassificationData,
    loss: ClassificationLoss,
    counts: list[int],
    per_epoch: int,
    total: int,
    resume: Path | None,
    done: int,
    lock: Any,
) -> None:
    run_dir = Path(cfg.paths.run_dir)
    L.seed_everything(process_seed(int(cfg.seed), launch_rank()), workers=True, verbose=False)
    if rank_zero_only.rank == 0:
        data.base.print_summary()
        if data.n_generated:
            print(f"plus {data.n_generated} generated images: {counts} per class")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    meta = {
        "config": resolved,
        "dataset": data.base.info(),
        "training_counts": counts,
        "code_version": code_version(),
    }
    schedule = EpochSchedule(
        per_epoch, int(cfg.train.warmup_epochs), list(cfg.train.milestones), float(cfg.train.gamma)
    )
    module = ClassifierModule(
        model=build_classifier(cfg),
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        schedule=schedule,
        class_counts=counts,
        cm_lam=float(cfg.capacity.lam),
        cm_con=bool(cfg.capacity.get("use_con", True)),
        cm_div=bool(cfg.capacity.get("use_div", True)),
        meta=meta,
    )
    callbacks = [
        # last.ckpt every train.ckpt_every steps, at the end and on Ctrl-C / SIGTERM (as the
        # diffusion runs' configs/callbacks/default.yaml), under the run lock's guard
        RunCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="last",
            every_n_train_steps=int(cfg.train.ckpt_every),
            save_top_k=1,
            enable_version_counter=False,
            final=True,
        ),
        RunLockGuard(run_dir, lock.lost if lock is not None else None),
        TQDMProgressBar(refresh_rate=max(1, int(cfg.train.log_every))),
    ]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_steps=total,
        logger=build_logger(cfg, done, run_dir),
        callbacks=callbacks,
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
        print(
            f"{total} steps ({cfg.train.epochs} epochs of {per_epoch} steps"
            f"{'' if cfg.train.max_steps is None else ', stopped at train.max_steps'})"
        )
    if resume is not None:
        rank_zero_info(f"Resuming from {resume} at step {done}")
    fit(trainer, module, datamodule=data, ckpt_path=str(resume) if resume else None)


def _evaluate(
    cfg: DictConfig,
    data: ClassificationData,
    loss: ClassificationLoss,
    checkpoint: Path,
    record_path: Path,
    identity: dict[str, Any],
    augmentation: dict[str, Any] | None,
    total: int,
    per_epoch: int,
    trained: float,
) -> dict[str, Any]:
    started = time.time()
    device = torch.device("cuda" if on_gpu(cfg) else "cpu")
    model, meta = load_classifier(checkpoint, device)
    images, labels = data.test_set()
    predictions = predict(model, images, loss, device, batch_size=4 * int(cfg.data.batch_size))
    metrics = classification_metrics(predictions, labels, data.base.splits)
    step = int(meta["global_step"])
    record = build_record(
        kind=KIND,
        config=OmegaConf.to_container(cfg, resolve=True),
        dataset=data.base.info(),
        checkpoint={
            "path": str(checkpoint.resolve()),
            "step": step,
            "max_steps": total,
            "epochs": round(step / per_epoch, 3),
        },
        training={
            "class_counts": data.class_counts,
            "n_real": len(data.labels) - data.n_generated,
            "n_generated": data.n_generated,
            "augmentation": augmentation,
        },
        test={
            "split": "test",
            "class_counts": labels.bincount(minlength=len(data.base.splits)).tolist(),
        },
        prediction={"top1": True, "posthoc_tau": loss.posthoc_tau},
        metrics=metrics,
        identity=identity,
        seconds={"train": round(trained, 1), "evaluate": round(time.time() - started, 1)},
    )
    print(f"{cfg.run_name}: {summary_line(metrics)}")
    write_record(record_path, record)
    print(f"Record: {record_path}")
    return record
