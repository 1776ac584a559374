"""Several seeds of one synthetic-benchmark run trained at once, vectorised over the seeds
(``train.engine: vectorized``, the toy experiments' setting; ``model=mlp`` on the CPU).

A toy run is a 0.1M-parameter MLP on points: one training step is a few milliseconds, most of
it fixed per-operation cost, and the Lightning loop's own work and a process start per run cost
as much again. Here the runs that differ only by their seed (and the seed-drawn long-tailed
subset, ``imbalance.seed``) train in one process and one loop: their weights are stacked, the
method's objective runs on every seed at once through ``torch.func.vmap`` (each seed on its own
batch), and one optimizer step updates them all. Nothing of the method is rewritten: the same
objective classes and backbone run, functionally (``torch.func.functional_call``).

What each seed gets is its own, whatever runs beside it: the initial weights of its seed (as
the Lightning path draws them), its own batch stream (:class:`~lt_diffusion.data.BatchStream`,
a pure function of seed and step), and every random draw of the objective (timesteps, noise,
label dropout, CBDM's labels, OC's references ...) from the counter-based generator of
:mod:`lt_diffusion.utils.draws` keyed by the seed. So a run trained alone, or beside any other
seeds, gives the same weights, and a resumed run continues exactly. Adam is elementwise, so one
optimizer over the stacked weights is each seed's own; gradient clipping is per seed.

Each run keeps its own run directory, lock, ``config.yaml``, ``checkpoints/last.ckpt`` (the
Lightning layout: ``state_dict`` with ``model.`` / ``ema_model.`` / ``objective.`` weights,
``global_step``, the run's metadata and this engine's optimizer state), ``train_log.csv`` (the
loss and the objective's terms, averaged over ``train.log_every`` steps) and export, so
evaluation, sampling, tables and resumption read it like any other run. Batch-mode label
dropout is a device coin per seed (:meth:`~lt_diffusion.methods.base.Objective.drop_condition`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lt_diffusion.runs.build import (
    build_datamodule,
    build_model,
    build_objective,
    build_schedule,
    instantiate,
)
from lt_diffusion.runs.checkpoint import (
    LAST,
    META_KEY,
    CheckpointError,
    export_ema,
    find_resume_checkpoint,
    read_checkpoint,
)
from lt_diffusion.runtime import code_version
from lt_diffusion.training.config_keys import check_known_keys
from lt_diffusion.training.module import LinearWarmup
from lt_diffusion.utils import draws
from lt_diffusion.utils.identity import digest, training_settings
from lt_diffusion.utils.io import atomic_torch_save, atomic_write_text, remove_temporaries
from lt_diffusion.utils.runlock import RunLock, RunLockedError, hold_run_lock
from lt_diffusion.utils.threads import torch_threads

ENGINES = ("lightning", "vectorized")
ENGINE = "vectorized"
# Settings in which runs trained together may differ (their seed, the seed-drawn subset, and
# what derives from them); everything else that defines the weights must be equal.
SEED_KEYS = (
    "seed",
    "imbalance.seed",
    "imbalance.name",
    "data.seed",
    "data.subset_seed",
    "run_name",
)
OPTIMIZER_KEY = "vectorized_optimizer"
LOG_FILE = "train_log.csv"


def engine(cfg: DictConfig) -> str:
    """The run's training engine (``train.engine``; ``lightning`` when unset), checked."""
    name = str(cfg.train.get("engine", "lightning"))
    if name not in ENGINES:
        raise ValueError(f"train.engine must be one of {ENGINES}, got {name!r}")
    return name


def group_key(cfg: DictConfig) -> str | None:
    """The key under which runs train together: equal for runs whose settings differ only in
    :data:`SEED_KEYS`; None for a run of another engine."""
    if engine(cfg) != ENGINE:
        return None
    settings = training_settings(cfg)
    for dotted in SEED_KEYS:
        *parents, leaf = dotted.split(".")
        node = settings
        for key in parents:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return digest(settings)


@dataclass
class Member:
    """One run of the group: its config, directory, data, modules and resume point."""

    cfg: DictConfig
    run_dir: Path
    lock: RunLock | None = None
    resume: Path | None = None
    step: int = 0
    datamodule: Any = None
    model: nn.Module | None = None
    ema: nn.Module | None = None
    objective: nn.Module | None = None
    ckpt: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)


def check_group(cfgs: Sequence[DictConfig]) -> None:
    """Refuse runs that cannot train together, before anything is read."""
    if not cfgs:
        raise ValueError("no run to train")
    for cfg in cfgs:
        check_known_keys(cfg)
        if engine(cfg) != ENGINE:
            raise ValueError(f"{cfg.run_name}: train.engine is not {ENGINE!r}")
        if not str(cfg.model._target_).endswith("MLPDenoiser"):
            raise ValueError(
                f"train.engine=vectorized trains the synthetic benchmark's MLP (model=mlp), "
                f"not {cfg.model._target_}: use train.engine=lightning"
            )
        if str(cfg.trainer.get("accelerator", "cpu")) not in ("cpu", "auto"):
            raise ValueError("train.engine=vectorized runs on the CPU: set trainer=cpu")
        if int(cfg.trainer.get("devices", 1)) != 1 or int(cfg.trainer.get("num_nodes", 1)) != 1:
            raise ValueError("train.engine=vectorized trains in one process: trainer.devices=1")
        if int(cfg.trainer.get("accumulate_grad_batches", 1)) != 1:
            raise ValueError("train.engine=vectorized has no gradient accumulation")
        if str(cfg.trainer.get("precision", "32-true")) not in ("32", "32-true"):
            raise ValueError("train.engine=vectorized trains in float32: trainer.precision=32")
        if cfg.train.get("init_from") or cfg.method.get("requires_init_from"):
            raise ValueError("train.engine=vectorized trains from scratch (no train.init_from)")
        if int(cfg.train.max_steps) < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    keys = {group_key(cfg) for cfg in cfgs}
    if len(keys) != 1:
        raise ValueError(
            "runs trained together must differ only in "
            f"{', '.join(SEED_KEYS)}: {[str(c.run_name) for c in cfgs]} do not"
        )
    dirs = [Path(c.paths.run_dir).resolve() for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"two runs of the group share a run directory: {dirs}")


def run(cfgs: Sequence[DictConfig]) -> list[Path]:
    """Train every run of ``cfgs`` (resuming each from its ``last.ckpt``); returns their run
    directories. Runs at different resume steps train in separate passes."""
    check_group(cfgs)
    members = [Member(cfg, Path(cfg.paths.run_dir)) for cfg in cfgs]
    with contextlib.ExitStack() as stack:
        for m in members:
            m.lock = stack.enter_context(hold_run_lock(m.run_dir))
            for tmp in remove_temporaries(m.run_dir / "checkpoints"):
                print(f"Removed {tmp}, a checkpoint write that was killed mid-way")
            m.resume = find_resume_checkpoint(m.run_dir / "checkpoints", m.cfg)
            if m.resume is not None:
                if not m.cfg.train.resume:
                    raise CheckpointError(
                        f"{m.resume} exists and train.resume=false: refusing to overwrite it. "
                        "Delete the run directory or set train.resume=true."
                    )
                m.ckpt = read_checkpoint(m.resume)
                m.step = int(m.ckpt["global_step"])
        todo = [m for m in members if m.step < int(m.cfg.train.max_steps)]
        for m in members:
            if m not in todo:
                print(f"Run already complete at step {m.step}: {m.resume}")
        with torch_threads(cfgs[0].train.get("threads"), "train.threads"), _no_accelerator_probe():
            for step in sorted({m.step for m in todo}):
                _train([m for m in todo if m.step == step])
    return [m.run_dir for m in members]


def _build(m: Member) -> None:
    """The member's data, model, EMA copy and objective, initialised as the Lightning path
    does (the seed's global generators before the model), restored from its checkpoint."""
    import lightning as L

    L.seed_everything(m.seed, workers=True, verbose=False)
    m.datamodule = build_datamodule(m.cfg, on_device=False)
    m.model = build_model(m.cfg)
    m.datamodule.setup("fit")
    m.objective = build_objective(m.cfg)
    m.objective.setup(m.datamodule.class_counts, seed=m.seed)
    m.ema = copy.deepcopy(m.model).eval().requires_grad_(False)
    if m.ckpt:
        state = m.ckpt["state_dict"]
        for prefix, module in (("model.", m.model), ("ema_model.", m.ema),
                               ("objective.", m.objective)):  # fmt: skip
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )


class _Functional(nn.Module):
    """A module that runs ``skeleton`` with the tensors of :attr:`state` (one seed's slice
    under vmap): what the objectives are given as the model. The skeleton stays a submodule,
    so the objectives' switches (CM's ``expert_switch``) reach its layers."""

    def __init__(self, skeleton: nn.Module) -> None:
        super().__init__()
        self.skeleton = skeleton
        self.state: dict[str, Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        """The skeleton's attributes (``null_label``, ``num_classes``, its router ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["skeleton"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.state:  # the tensors are bound into the skeleton (one seed)
            return self.skeleton(*args, **kwargs)
        # Every tensor of the skeleton is given, none tied: no untying pass per call.
        return functional_call(self.skeleton, self.state, args, kwargs, tie_weights=False)


def _bind(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Make ``tensors`` (views of the stacked weights) the module's own, in place of its
    parameters and buffers: the one-seed loop then runs the module as it is."""
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        sub._parameters.pop(leaf, None)
        sub._buffers.pop(leaf, None)
        object.__setattr__(sub, leaf, t)


def _stack(modules: Sequence[nn.Module], what: str) -> dict[str, Tensor]:
    """The modules' parameters and persistent buffers, stacked along a new first dimension."""
    tensors = [_tensors(m) for m in modules]
    if any(list(t) != list(tensors[0]) for t in tensors):
        raise ValueError(f"the runs' {what}s differ in structure: they cannot train together")
    return {k: torch.stack([t[k].detach() for t in tensors]) for k in tensors[0]}


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    out = dict(module.named_parameters())
    out.update({k: v for k, v in module.state_dict().items() if k not in out})
    return out


def _train(members: list[Member]) -> None:
    for m in members:
        _build(m)
    cfg, first = members[0].cfg, members[0]
    counts = [m.datamodule.class_counts for m in members]
    if any(c != counts[0] for c in counts):
        raise ValueError(f"the runs' class counts differ ({counts}): they cannot train together")
    start, max_steps = first.step, int(cfg.train.max_steps)
    names = [m.cfg.run_name for m in members]
    print(f"Training {len(members)} run(s) together from step {start} to {max_steps}: {names}")
    first.datamodule.print_summary()
    for m in members:
        atomic_write_text(
            m.run_dir / "config.yaml",
            OmegaConf.to_yaml(OmegaConf.to_container(m.cfg, resolve=True)),
        )

    schedule = build_schedule(cfg)
    params = _stack([m.model for m in members], "model")
    train_names = [k for k, p in first.model.named_parameters() if p.requires_grad]
    obj_params = dict(first.objective.named_parameters())
    obj_state = _stack([m.objective for m in members], "objective")
    ema = _stack([m.ema for m in members], "EMA model")
    for k in train_names:
        params[k].requires_grad_(True)
    for k in obj_params:
        obj_state[k].requires_grad_(True)
    trainable = [params[k] for k in train_names] + [obj_state[k] for k in obj_params]
    optimizer = instantiate(cfg.optimizer)(trainable)
    lr_lambda = LinearWarmup(
        int(cfg.train.warmup_steps), str(cfg.train.get("lr_schedule", "constant")), max_steps
    )
    if start > 0:
        _load_optimizer(optimizer, members, trainable)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    skeleton = copy.deepcopy(first.model).train()
    model = _Functional(skeleton)
    objective = copy.deepcopy(first.objective).train()
    seeds = [m.seed for m in members]
    model_names = list(params)

    def loss_of(p: dict, o: dict, key: Tensor | int, x0: Tensor, y: Tensor, step: int) -> Any:
        model.state = p
        with draws.keyed(key, step):
            if o:  # the objective's own weights or running statistics (CORAL, Focal)
                out = functional_call(objective, o, (model, x0, y, schedule), tie_weights=False)
            else:
                out = objective(model, x0, y, schedule)
        return out.loss, out.terms

    if len(members) > 1:
        vmapped = vmap(loss_of, in_dims=(0, 0, 0, 0, 0, None), randomness="error")
        keys = torch.tensor(seeds, dtype=torch.long)

        def batched(x0: Tensor, y: Tensor, step: int) -> Any:
            return vmapped({k: params[k] for k in model_names}, obj_state, keys, x0, y, step)

    else:  # one seed: its slices bound into the modules once, no vmap, no per-call swapping
        _bind(skeleton, {k: v[0] for k, v in params.items()})
        _bind(objective, {k: v[0] for k, v in obj_state.items()})

        def batched(x0: Tensor, y: Tensor, step: int) -> Any:
            loss, terms = loss_of({}, {}, seeds[0], x0[0], y[0], step)
            return loss[None], {k: v[None] for k, v in terms.items()}

    streams = [_stream(m, start) for m in members]
    log = _Log(members, int(cfg.train.log_every), start)
    ema_decay, clip = float(cfg.train.ema_decay), float(cfg.train.get("grad_clip") or 0.0)
    every = max(1, int(cfg.train.ckpt_every))
    step = start
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: interrupted.append(1))
    try:
        while step < max_steps and not interrupted:
            batch = [next(s) for s in streams]
            x0 = torch.stack([b[0] for b in batch])
            y = torch.stack([b[1] for b in batch])
            lr = lr_lambda(step)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr
            loss, terms = batched(x0, y, step)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            if clip > 0:
                _clip_per_seed(trainable, clip)
            optimizer.step()
            with torch.no_grad():
                _lerp(ema, params, 1.0 - ema_decay)
            step += 1
            log.add(step, loss.detach(), {k: v.detach() for k, v in terms.items()})
            if step % every == 0 or step == max_steps:
                _save(members, params, ema, obj_state, optimizer, trainable, step)
    except KeyboardInterrupt:
        _save(members, params, ema, obj_state, optimizer, trainable, step)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        log.flush(step)
        log.close()
    if interrupted:  # SIGTERM (a requeue or a time limit): save, then stop without a result
        _save(members, params, ema, obj_state, optimizer, trainable, step)
        raise SystemExit(f"Stopped by SIGTERM at step {step}; the runs resume from last.ckpt")
    for m in members:
        if m.cfg.train.export:
            meta = {**_meta(m), "global_step": step}
            export_ema(m.ema.state_dict(), meta, m.run_dir / "export")
        if m.cfg.get("callbacks") and m.cfg.callbacks.get("sample_grid") is not None:
            _scatter(m, schedule)
        print(f"Run directory: {m.run_dir}\n  checkpoint: {m.run_dir / 'checkpoints' / LAST}")


def _stream(m: Member, start: int) -> Any:
    """The member's batch stream from batch ``start`` (the same as the Lightning path's)."""
    from lt_diffusion.data import BatchStream

    dm = m.datamodule
    return iter(
        BatchStream(dm.train_images, dm.train_labels, dm.batch_size, dm.sampler, False,
                    seed=dm.seed, rank=0, start_batch=start)
    )  # fmt: skip


@torch.no_grad()
def _clip_per_seed(tensors: list[Tensor], max_norm: float) -> None:
    """``clip_grad_norm_(max_norm)`` of each seed's own gradients (the slices ``[s]``)."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return
    seeds = grads[0].shape[0]
    norm = torch.cat([g.reshape(seeds, -1) for g in grads], dim=1).norm(dim=1)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *([1] * (g.ndim - 1))))


def _lerp(ema: dict[str, Tensor], params: dict[str, Tensor], weight: float) -> None:
    """``ema <- ema + weight (param - ema)`` for parameters (one fused call); buffers copied
    (as ema_update)."""
    moving = [k for k in ema if params[k].requires_grad]
    torch._foreach_lerp_([ema[k] for k in moving], [params[k].detach() for k in moving], weight)
    for k in ema.keys() - set(moving):
        ema[k].copy_(params[k])


@contextlib.contextmanager
def _no_accelerator_probe() -> Any:
    """On the CPU, hide absent GPUs from torch while training: each optimizer step otherwise
    asks NVML for a device count (a shared-library load) that torch does not cache before
    CUDA is initialised, a sizeable share of a toy step."""
    import os

    if torch.cuda.is_initialized() or "CUDA_VISIBLE_DEVICES" in os.environ:
        yield
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)


def _meta(m: Member) -> dict[str, Any]:
    return {
        "config": OmegaConf.to_container(m.cfg, resolve=True),
        "dataset": m.datamodule.info(),
        "code_version": code_version(),
    }


def _save(
    members: list[Member],
    params: dict[str, Tensor],
    ema: dict[str, Tensor],
    obj_state: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    trainable: list[Tensor],
    step: int,
) -> None:
    """Every member's ``last.ckpt`` at ``step`` (its slice of every stacked tensor), each
    written atomically under its lock."""
    state = optimizer.state_dict()["state"]
    for s, m in enumerate(members):
        lost = m.lock.lost() if m.lock is not None else None
        if lost:
            raise RunLockedError(f"Stopping without writing to {m.run_dir}: {lost}")
        with torch.no_grad():
            for module, stacked in ((m.model, params), (m.ema, ema), (m.objective, obj_state)):
                for k, v in _tensors(module).items():
                    v.copy_(stacked[k][s])
        weights = {f"model.{k}": v for k, v in m.model.state_dict().items()}
        weights.update({f"ema_model.{k}": v for k, v in m.ema.state_dict().items()})
        weights.update({f"objective.{k}": v for k, v in m.objective.state_dict().items()})
        adam = {
            i: {k: (v[s].clone() if torch.is_tensor(v) and v.ndim > 0 else v)
                for k, v in state.get(i, {}).items()}
            for i in range(len(trainable))
        }  # fmt: skip
        ckpt = {
            "epoch": 0,
            "global_step": int(step),
            "state_dict": weights,
            OPTIMIZER_KEY: adam,
            META_KEY: _meta(m),
            "engine": ENGINE,
        }
        atomic_torch_save(ckpt, m.run_dir / "checkpoints" / LAST)


def _load_optimizer(
    optimizer: torch.optim.Optimizer, members: list[Member], trainable: list[Tensor]
) -> None:
    """The optimizer state of the members' checkpoints, stacked (resume)."""
    states = [m.ckpt.get(OPTIMIZER_KEY) for m in members]
    if any(s is None or len(s) != len(trainable) for s in states):
        raise CheckpointError(
            f"{members[0].resume} holds no optimizer state of train.engine=vectorized for "
            "these parameters: it was written by another engine or version"
        )
    full = optimizer.state_dict()
    full["state"] = {
        i: {k: (torch.stack([s[i][k] for s in states]) if torch.is_tensor(v) and v.ndim > 0
                else v) for k, v in states[0][i].items()}
        for i in range(len(trainable))
    }  # fmt: skip
    optimizer.load_state_dict(full)


class _Log:
    """``<run_dir>/train_log.csv`` of every member: the loss and the objective's terms, each
    the mean over ``every`` steps (a resumed run keeps its rows up to the resume step)."""

    def __init__(self, members: list[Member], every: int, start: int) -> None:
        self.members, self.every = members, max(1, every)
        self.sums: dict[str, Tensor] = {}
        self.n = 0
        self.files: list[Any] = []
        self.writers: list[Any] = []
        self.header: list[str] | None = None
        self.start = start

    def add(self, step: int, loss: Tensor, terms: dict[str, Tensor]) -> None:
        values = {"loss": loss, **terms}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.n += 1
        if step % self.every == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        if not self.n:
            return
        if self.header is None:
            self.header = ["step", *self.sums]
            for m in self.members:
                self.files.append(_reopen(m.run_dir / LOG_FILE, self.header, self.start))
                self.writers.append(csv.writer(self.files[-1]))
        means = {k: (v / self.n).tolist() for k, v in self.sums.items()}
        for s, w in enumerate(self.writers):
            w.writerow([step, *(_fmt(means[k][s]) for k in self.header[1:])])
            self.files[s].flush()
        self.sums, self.n = {}, 0

    def close(self) -> None:
        for f in self.files:
            f.close()


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.6g}"


def _reopen(path: Path, header: list[str], start: int) -> Any:
    """The log for appending, keeping the rows up to ``start`` of a matching earlier log."""
    rows: list[list[str]] = []
    if start > 0 and path.is_file():
        with open(path, newline="") as f:
            old = list(csv.reader(f))
        if old and old[0] == header:
            rows = [r for r in old[1:] if r and int(r[0]) <= start]
    f = open(path, "w", newline="")  # noqa: SIM115 - closed by _Log.close
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
    return f


def _scatter(m: Member, schedule: Any) -> None:
    """``<run_dir>/samples/latest.png``: the EMA model's points, as the sample-grid callback
    draws them for a model of vectors."""
    from lt_diffusion.diffusion import DDIMSampler, generate_vectors
    from lt_diffusion.training.callbacks import scatter_png
    from lt_diffusion.utils.io import atomic_write_bytes

    cfg = m.cfg
    per_class = int(cfg.train.grid_per_class)
    labels = torch.arange(m.ema.num_classes).repeat_interleave(per_class)
    sampler = DDIMSampler(schedule, steps=int(cfg.train.grid_steps), clip_denoised=True)
    points = generate_vectors(
        m.ema, sampler, labels, seed=m.seed, batch_size=256,
        guidance=float(cfg.sampler.guidance),
    )  # fmt: skip
    png = scatter_png(points.numpy(), labels.numpy())
    atomic_write_bytes(m.run_dir / "samples" / "latest.png", png)
