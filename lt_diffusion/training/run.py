"""One training run, as ``python -m lt_diffusion.train`` (and a table's jobs) run it.

Everything that can be checked is checked before the first step (unknown config keys, dataset
files, ratio, the resume checkpoint). The run directory is derived from the config, so
launching the same run again resumes it from ``<run_dir>/checkpoints/last.ckpt``, exactly
(the checkpoint holds every random state). One training at a time writes a run directory: it
holds ``<run_dir>/train.lock`` (:mod:`lt_diffusion.utils.runlock`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.data.datamodule import stream_seed
from lt_diffusion.runs.build import build_datamodule, build_model, build_objective, build_schedule
from lt_diffusion.runs.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    LAST,
    META_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    export_ema,
    find_resume_checkpoint,
    model_state,
    read_checkpoint,
)
from lt_diffusion.runs.load import wandb_run_id
from lt_diffusion.runtime import code_version
from lt_diffusion.training import vectorized
from lt_diffusion.training.callbacks import RunLockGuard
from lt_diffusion.training.config_keys import check_known_keys
from lt_diffusion.training.csvlog import ResumableCSVLogger
from lt_diffusion.training.module import DiffusionModule
from lt_diffusion.utils import quiet
from lt_diffusion.utils.io import atomic_write_text, remove_temporaries_below
from lt_diffusion.utils.runlock import RunLock, RunLockedError, describe_holder, hold_run_lock
from lt_diffusion.utils.threads import torch_threads

# Folders of a run directory whose temporary files the training's start leaves alone: an
# evaluation writes its records without the run's lock (one may be writing now), wandb keeps
# its own files. Everything else there is written by the lock holder (checkpoints, export,
# config.yaml, .hydra, logs, sample grids, the lock file itself).
NOT_SWEPT = ("records", "wandb")


def on_gpu(cfg: DictConfig) -> bool:
    """Whether the run's trainer trains on a GPU (``accelerator: auto`` when one exists)."""
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    return accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())


def _auto(value: Any, default: bool) -> bool:
    return default if value == "auto" else bool(value)


def cluster_plugins() -> list[Any]:
    """Under SLURM, Lightning's own auto-requeue (on SIGUSR1) is switched off: the launcher
    (submitit) owns requeueing, and the run resumes from ``last.ckpt`` when it restarts."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def build_logger(cfg: DictConfig, resume_step: int = 0, run_dir: Path | None = None) -> Any:
    """The configured logger. A resuming CSV logger is told where the run resumes; wandb logs
    to the run directory's wandb run when it has one (its id, from
    ``<run_dir>/wandb/latest-run``: an earlier attempt's), unless ``logger.id`` names one, so
    that a run directory is one wandb run however often it was stopped and started again."""
    if cfg.get("logger") is None or cfg.logger.get("_target_") is None:
        return False
    target = hydra.utils.get_class(cfg.logger._target_)
    if issubclass(target, ResumableCSVLogger):
        return instantiate(cfg.logger, resume_step=resume_step)
    if issubclass(target, WandbLogger):
        quiet.prepare_wandb()  # its settings warnings follow WANDB_SILENT only after setup
    if issubclass(target, WandbLogger) and not cfg.logger.get("id"):
        run_id = wandb_run_id(run_dir) if run_dir is not None else None
        if run_id is not None:
            return instantiate(cfg.logger, id=run_id, resume="allow")
    return instantiate(cfg.logger)


def fit(trainer: L.Trainer, module: L.LightningModule, **kwargs: Any) -> None:
    """``trainer.fit``; an error raised once the process got SIGTERM ends the run as that
    SIGTERM does (Lightning's ``SIGTERMException``: RunCheckpoint has saved what can be saved),
    not as a failure. SLURM stops a job by signalling all its processes, so the helpers die
    with the training (wandb's service, the ``scontrol requeue`` submitit runs at a time
    limit) and their errors reach it; submitit would then record a failed result for a job that
    is being requeued (its sweep, or table, counting it failed while it goes on)."""
    try:
        with _requeue_stops_at_the_step_end(trainer):
            trainer.fit(module, **kwargs)
    except Exception as err:
        if not trainer.received_sigterm:
            raise
        rank_zero_warn(
            f"{type(err).__name__} after SIGTERM ({str(err)[:200]}): part of the job being "
            "stopped (a SLURM requeue, time limit or preemption), not a failure of the run"
        )
        raise SIGTERMException from err


@contextlib.contextmanager
def _requeue_stops_at_the_step_end(trainer: L.Trainer) -> Iterator[None]:
    """While the training runs, submitit's handler of the time-limit signal (USR2 under
    ``hydra/launcher=slurm``: ``signal_delay_s`` before the limit) requeues the job but does not
    exit on the spot. Its ``sys.exit(-1)`` would cut the current step short wherever it is: the
    step reached unsaved (the run resumes from the last periodic checkpoint) and, when it falls
    between a periodic checkpoint and the CSV row of that step, the row lost for good. Instead
    the SIGTERM SLURM sends for the requeue stops the training at the end of the step, which
    RunCheckpoint saves, as for ``scontrol requeue``. Handlers other than submitit's, and
    the time before and after ``fit``, are left alone."""
    wrapped: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # signals: main thread only
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            handler = signal.getsignal(signum)
            owner = type(getattr(handler, "__self__", None)).__module__
            ours = getattr(handler, "__name__", "") == "checkpoint_and_try_requeue"
            if not (ours and owner.startswith("submitit.")):
                continue

            def requeue(signum: int, frame: Any, handler: Any = handler) -> None:
                try:
                    handler(signum, frame)  # checkpoint the job's arguments, scontrol requeue
                except SystemExit:
                    rank_zero_info(
                        "submitit requeued the job (time limit or preemption): the training "
                        "stops at the end of this step, saved, when SLURM's SIGTERM comes"
                    )
                except Exception as err:
                    if not trainer.received_sigterm:
                        raise
                    # scontrol stopped by the requeue it asked for: the job is requeued anyway
                    rank_zero_warn(f"{type(err).__name__} after SIGTERM in submitit's requeue")

            signal.signal(signum, requeue)
            wrapped[signum] = handler
    try:
        yield
    finally:
        for signum, handler in wrapped.items():
            signal.signal(signum, handler)


def build_callbacks(cfg: DictConfig, run_dir: Path, lock: RunLock | None) -> list[L.Callback]:
    """The ``callbacks`` group's callbacks (an entry set to null is left out), and the guard
    that stops a run which lost its run directory's lock before any checkpoint write."""
    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return [*configured, RunLockGuard(run_dir, lock.lost if lock is not None else None)]


def launch_rank() -> int:
    """This process's rank, from its launcher's environment (the Trainer does not exist yet):
    torchrun's RANK; under Lightning's own launcher LOCAL_RANK (its children) and NODE_RANK (a
    node's first process has only that); else SLURM's SLURM_PROCID. Distinct per process, and 0
    only for global rank 0 (with NODE_RANK it is not the Trainer's numbering)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        return int(env.get("NODE_RANK", 0)) * 2**16 + int(env.get("LOCAL_RANK", 0))
    return int(env.get("SLURM_PROCID", 0))


def process_seed(seed: int, rank: int) -> int:
    """Seed of one process's global generators: ``seed`` itself on rank 0 (a one-process run
    is unchanged), an unrelated stream on the others so that ranks do not draw the same
    timesteps and noise (DDP makes the initial weights equal anyway)."""
    return seed if rank == 0 else stream_seed(seed, rank) % 2**32


def initial_weights(cfg: DictConfig, resume: Path | None) -> dict[str, torch.Tensor] | None:
    """Backbone weights from ``train.init_from`` for a fresh run (a resumed run has its own)."""
    if resume is not None:
        return None
    if not cfg.train.get("init_from"):
        if cfg.method.get("requires_init_from"):
            raise ValueError(
                f"method={cfg.method.name} fine-tunes a trained model: set train.init_from to its "
                "checkpoint (e.g. the CBDM run's checkpoints/last.ckpt)"
            )
        return None
    ckpt = read_checkpoint(cfg.train.init_from)
    if ckpt[META_KEY]["config"]["method"].get("model_transform") is not None:
        raise CheckpointError(
            f"train.init_from={cfg.train.init_from} holds a transformed model (its method has a "
            "model_transform): initialise from a plain backbone checkpoint instead."
        )
    rank_zero_info(f"Initialising the backbone from {cfg.train.init_from}")
    return model_state(ckpt, ema=cfg.train.get("init_from_ema", True))


def _step(ckpt: Path) -> int:
    return int(read_checkpoint(ckpt).get("global_step", 0))


def _say_complete(ckpt: Path) -> None:
    rank_zero_info(f"Run already complete at step {_step(ckpt)}: {ckpt}")


@contextlib.contextmanager
def launch_record(run_dir: Path, cfg: DictConfig, enabled: bool = True) -> Iterator[None]:
    """What Hydra writes into a command's output folder when it starts, written here by the
    holder of the run's lock instead (``configs/train.yaml`` turns Hydra's own off), so that a
    training the lock refuses leaves the live run's untouched: ``.hydra/`` (config.yaml, the
    composed config; hydra.yaml; overrides.yaml, the command line's overrides) and the log
    ``train.log`` (appended to for the ``with`` block). Only under the Hydra of the train and
    classify commands (their ``hydra.output_subdir`` is null)."""
    from hydra.core.hydra_config import HydraConfig

    if not enabled or not HydraConfig.initialized():
        yield
        return
    hc = HydraConfig.get()
    folder = run_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hc.overrides.task))
    # Hydra's default job log file: <output dir>/<job name>.log, its format.
    handler = logging.FileHandler(run_dir / f"{hc.job.name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run(cfg: DictConfig, launch_files: bool = False) -> Path:
    """Train the run ``cfg`` describes; returns its run directory.

    Rank 0 holds the run directory's lock for the whole training (the other ranks of a
    distributed run write nothing of their own). ``launch_files``: the train command's Hydra
    launch record goes into the run directory once the lock is held (:func:`launch_record`)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls where the GPU has them
    run_dir = Path(cfg.paths.run_dir)
    check_known_keys(cfg)
    if vectorized.engine(cfg) == vectorized.ENGINE:  # the synthetic benchmark's own loop
        return vectorized.run([cfg])[0]
    if cfg.train.max_steps < 1:
        last = find_resume_checkpoint(run_dir / "checkpoints", cfg)
        if last is None:
            raise ValueError(
                f"train.max_steps={cfg.train.max_steps}: a run needs at least one step. Set "
                "train.max_steps to the number of optimisation steps to train for."
            )
        _say_complete(last)
        return run_dir
    with (
        hold_run_lock(run_dir, enabled=launch_rank() == 0) as lock,
        launch_record(run_dir, cfg, enabled=launch_files and lock is not None),
        torch_threads(cfg.train.get("threads"), "train.threads"),
    ):
        return _train(cfg, run_dir, lock)


def run_together(cfgs: list[DictConfig]) -> list[Path]:
    """Train several runs in this process; returns their run directories. Runs of
    ``train.engine: vectorized`` train at once (:mod:`lt_diffusion.training.vectorized`),
    others one after the other."""
    if cfgs and all(vectorized.engine(c) == vectorized.ENGINE for c in cfgs):
        for cfg in cfgs:
            check_known_keys(cfg)
        return vectorized.run(cfgs)
    return [run(cfg) for cfg in cfgs]


def _train(cfg: DictConfig, run_dir: Path, lock: RunLock | None) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    gpu = on_gpu(cfg)
    if lock is not None:
        if lock.took_over:
            rank_zero_info(f"Took over the run directory from {describe_holder(lock.took_over)}")
        # Under the lock no one else writes here: these are leftovers of killed writes.
        for tmp in remove_temporaries_below(run_dir, skip=NOT_SWEPT):
            rank_zero_info(f"Removed {tmp}, a write that was killed mid-way")
    L.seed_everything(process_seed(cfg.seed, launch_rank()), workers=True, verbose=False)

    # Cheap checks first: the callbacks' settings, the data source (files, ratio, names) and the
    # resume checkpoint.
    callbacks = build_callbacks(cfg, run_dir, lock)
    datamodule = build_datamodule(cfg, on_device=_auto(cfg.data.on_device, gpu))
    resume = find_resume_checkpoint(ckpt_dir, cfg)
    if resume is not None and not cfg.train.resume:
        raise CheckpointError(
            f"{resume} exists and train.resume=false: refusing to overwrite it. Delete the run "
            "directory, choose another run_name / tag, or set train.resume=true."
        )
    resume_step = _step(resume) if resume is not None else 0
    if resume is not None and resume_step >= cfg.train.max_steps:
        _say_complete(resume)
        return run_dir
    # The model before the data: it loads what the user staged (autoencoder, text encoder), and
    # a missing folder must stop the run before the dataset is read and prepared.
    model = build_model(cfg, init_state=initial_weights(cfg, resume))
    datamodule.setup("fit")
    if rank_zero_only.rank == 0:
        datamodule.print_summary()

    objective = build_objective(cfg)
    objective.setup(datamodule.class_counts, seed=cfg.seed + rank_zero_only.rank)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    meta = {"config": resolved, "dataset": datamodule.info(), "code_version": code_version()}
    module = DiffusionModule(
        model=model,
        objective=objective,
        schedule=build_schedule(cfg),
        optimizer=instantiate(cfg.optimizer),
        warmup_steps=cfg.train.warmup_steps,
        ema_decay=cfg.train.ema_decay,
        lr_schedule=str(cfg.train.get("lr_schedule", "constant")),
        max_steps=int(cfg.train.max_steps),
        compile_model=_auto(cfg.train.compile, gpu),
        channels_last=_auto(cfg.train.channels_last, gpu),
        meta=meta,
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=build_logger(cfg, resume_step, run_dir),
        callbacks=callbacks,
        # Lightning would add its own ModelCheckpoint (every epoch) when none is configured.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    if resume is not None:
        rank_zero_info(f"Resuming from {resume} at step {resume_step}")
    with warnings.catch_warnings():
        # Counts the modules in eval mode by design too (the EMA copy, ...); the module warns
        # of trainable ones itself (DiffusionModule.on_train_start).
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode")
        fit(trainer, module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    if cfg.train.export and trainer.is_global_zero:
        export(module, trainer.global_step, run_dir / "export", lock)
    rank_zero_info(f"Run directory: {run_dir}\n  checkpoint: {ckpt_dir / LAST}")
    return run_dir


def export(module: DiffusionModule, step: int, folder: Path, lock: RunLock | None) -> None:
    """The finished run's EMA model as safetensors with its config (rank 0, under the lock)."""
    lost = lock.lost() if lock is not None else None
    if lost:
        raise RunLockedError(f"Not exporting to {folder}: {lost}")
    export_ema(module.ema_model.state_dict(), {**module.meta, "global_step": step}, folder)
    rank_zero_info(f"Exported the EMA model to {folder} ({EXPORT_WEIGHTS}, {EXPORT_CONFIG})")
