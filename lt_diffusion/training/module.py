"""One LightningModule for every method: the objective is a pluggable part (DESIGN.md step 4).

Nothing here is method-specific. Speed: the live backbone can run under ``torch.compile`` and
channels-last; the training step never synchronises with the host (logging is of tensors and
the progress bar refreshes every ``log_every`` steps).

Latent backbones (:mod:`lt_diffusion.models.latent`) train on autoencoder latents: at fit start
the datamodule's training images are encoded once (or read from the latent cache) and the batch
stream serves their posterior moments; each step draws ``x_0`` from them. Backbones conditioned
on class names (Stable Diffusion's prompts) get the datamodule's names at setup; backbones
conditioned on captions (``set_captions``) get the datamodule's training captions at fit start
(after the move to the device, so the EMA copy shares one table there), and each step binds the
caption rows the stream drew (``bound_captions``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.diffusion.generate import is_latent_model
from lt_diffusion.methods.base import Objective
from lt_diffusion.models.ema import ema_update
from lt_diffusion.models.latent_cache import encoded_training_set
from lt_diffusion.runs.checkpoint import META_KEY
from lt_diffusion.runs.load import load_run
from lt_diffusion.training import rng

LR_SCHEDULES = ("constant", "cosine")


def stepwise_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    modules: Iterable[nn.Module],
    lr_lambda: Callable[[int], float],
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: ``factory`` over the trainable parameters
    of ``modules``, its learning rate scaled by ``lr_lambda(step)`` at every step."""
    optimizer = factory([p for m in modules for p in m.parameters() if p.requires_grad])
    scheduler = LambdaLR(optimizer, lr_lambda)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LinearWarmup:
    """LR multiplier rising linearly from 1/warmup to 1 over ``warmup`` steps (picklable);
    ``schedule="cosine"`` then decays it as ``(1 + cos(pi step / total)) / 2`` to 0 at
    ``total`` steps (``train.lr_schedule``, ``train.max_steps``)."""

    def __init__(self, warmup: int, schedule: str = "constant", total: int = 0) -> None:
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and int(total) < 1:
            raise ValueError(f"a cosine schedule needs train.max_steps >= 1, got {total}")
        self.warmup = max(0, int(warmup))
        # Only a cosine schedule reads the budget: a constant one keeps none in its state, so
        # that extending train.max_steps resumes into the same scheduler state.
        self.schedule, self.total = schedule, int(total) if schedule == "cosine" else 0

    def __call__(self, step: int) -> float:
        rise = 1.0 if self.warmup == 0 else min(1.0, (step + 1) / self.warmup)
        if getattr(self, "schedule", "constant") == "constant":  # older pickles: constant
            return rise
        return rise * 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


class DiffusionModule(L.LightningModule):
    """Trains ``model`` with ``objective`` under ``schedule``; keeps an EMA copy for sampling.

    Args:
        model: backbone mapping ``(x_t, t, y) -> eps``.
        objective: the method (loss) to optimise.
        schedule: the forward noise schedule.
        optimizer: a partial optimizer constructor taking the parameters.
        warmup_steps: linear learning-rate warm-up.
        lr_schedule: ``constant`` after the warm-up, or ``cosine`` decay to 0 at ``max_steps``.
        max_steps: the run's length (the cosine schedule's).
        ema_decay: EMA decay per step.
        compile_model: run the live backbone under ``torch.compile``.
        channels_last: keep weights and batches in channels-last memory format.
        meta: stored in every checkpoint (resolved config, dataset description).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        schedule: NoiseSchedule,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        compile_model: bool = False,
        channels_last: bool = False,
        meta: dict[str, Any] | None = None,
        lr_schedule: str = "constant",
        max_steps: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {ema_decay}")
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.objective, self.schedule, self.optimizer_factory = objective, schedule, optimizer
        self.warmup_steps, self.ema_decay = warmup_steps, ema_decay
        self.lr_lambda = LinearWarmup(warmup_steps, lr_schedule, max_steps)
        self.compile_model, self.channels_last = compile_model, channels_last
        self.meta = meta or {}
        # Before Lightning restores a resumed checkpoint: objectives with networks of their own
        # (consistency distillation's teacher and target) make them here.
        # The teacher is loaded on the CPU; the objective moves it to the batch's device.
        objective.bind(model, schedule, lambda path: load_run(path, device="cpu"))
        self._net: Callable[..., Tensor] = model
        self.latent = is_latent_model(model)
        # True once the batch stream serves encoded posterior moments instead of pixels.
        self.encoded_batches = False
        # Random states read from a resumed checkpoint, restored when training starts.
        self._pending_rng: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.ema_model.to(memory_format=torch.channels_last)
            self.objective.to(memory_format=torch.channels_last)  # its own networks, if any
        # The compiled wrapper is kept out of the module tree so checkpoints hold plain keys.
        net = torch.compile(self.model) if self.compile_model else self.model
        object.__setattr__(self, "_net", net)
        self._bind_class_names()

    def _datamodule(self) -> Any:
        trainer = self._trainer  # None outside a Trainer (self.trainer would raise)
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _bind_class_names(self) -> None:
        """Give a backbone conditioned on class names (``set_class_names``) the dataset's,
        in label order; the EMA copy takes the live model's encoding."""
        dm = self._datamodule()
        names = list(getattr(dm, "class_names", None) or [])
        if not names or not hasattr(self.model, "set_class_names"):
            return
        self.model.set_class_names(names)
        self.ema_model.set_class_names(names, like=self.model)

    def on_fit_start(self) -> None:
        if self.latent:
            self._use_encoded_training_set()
        self._bind_captions()

    def _bind_captions(self) -> None:
        """Give a caption-conditioned backbone the training captions (embedded once, through
        its cache: rank 0 first, the other ranks then read its file); the EMA copy shares the
        live model's tables."""
        dm = self._datamodule()
        if not hasattr(self.model, "set_captions") or dm is None:
            return
        captions, classes = dm.caption_table()
        first = self.trainer.is_global_zero
        if first:
            self.model.set_captions(captions, classes, device=self.device)
        self.trainer.strategy.barrier("caption_cache")
        if not first:
            self.model.set_captions(captions, classes, device=self.device)
        self.ema_model.set_captions(captions, classes, like=self.model)

    def _use_encoded_training_set(self) -> None:
        """Encode the training images once (rank 0, through the latent cache; the other ranks
        read its file) and make the datamodule serve the encodings."""
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "use_encoded"):
            return  # pixel batches: encoded at every step instead
        cache_dir = getattr(self.model, "latent_cache_dir", None)
        kwargs = {
            "mirror": bool(getattr(dm, "hflip", False)),
            "cache_dir": cache_dir,
            "device": self.device,
            "batch_size": int(getattr(dm, "batch_size", 64)),
        }
        images, labels = dm.train_images, dm.train_labels
        first = self.trainer.is_global_zero
        encoded = encoded_training_set(self.model, images, labels, **kwargs) if first else None
        self.trainer.strategy.barrier("latent_cache")
        if encoded is None:
            compute = cache_dir is None  # without a shared cache every rank encodes
            encoded = encoded_training_set(self.model, images, labels, compute=compute, **kwargs)
        dm.use_encoded(encoded.moments, encoded.mirrored)
        self.encoded_batches = True

    def diffusion_input(self, x: Tensor) -> Tensor:
        """The clean sample ``x_0`` the objective diffuses: ``x`` itself for pixel backbones,
        one posterior draw of the encoded moments (or of freshly encoded pixels) for latent
        ones."""
        if not self.latent:
            return x
        if self.encoded_batches:
            return self.model.latents_from_moments(x)
        return self.model.encode_images(x)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *captions = batch  # a text-to-image stream adds each sample's caption row
        x = self.diffusion_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bound = self.model.bound_captions(captions[0]) if captions else contextlib.nullcontext()
        with bound:
            out = self.objective(self._net, x, y, self.schedule)
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.terms.items():
            self.log(f"train/{name}", value)
        return out.loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks' batch-end hooks (the periodic
        # checkpoint) run before the module's, so the checkpoint of step k held the EMA of
        # step k - 1 and a resumed run never made update k.
        ema_update(self.ema_model, self.model, self.ema_decay)
        self.objective.after_optimizer_step(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        return stepwise_optimizer(
            self.optimizer_factory, (self.model, self.objective), self.lr_lambda
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.meta
        # Every rank runs this (checkpoint writes are collective): gather all ranks' states.
        checkpoint[rng.RNG_KEY] = rng.gather(rng.capture(self.objective, self.device))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restored at train start, not now: building the batch iterator after this point
        # draws from the global generator, which an uninterrupted run did before step 0.
        states = checkpoint.get(rng.RNG_KEY)
        world = self.trainer.world_size
        if states is None or len(states) != world:
            why = (
                "it holds no random state (written by an older version)"
                if states is None
                else f"it was written by {len(states)} processes, this run has {world}"
            )
            rank_zero_warn(
                f"The resumed checkpoint cannot continue its random sequence: {why}. Training "
                "goes on from the seed's initial random states, so it will not repeat an uninterrupted run."
            )
            return
        self._pending_rng = states[self.global_rank]

    def on_train_start(self) -> None:
        # Modules in eval mode by design hold no trainable weights (the EMA copy, frozen
        # autoencoders and text encoders, CD's target network); a trainable one is a bug that
        # runs dropout and normalisation as in evaluation. (Lightning's own warning counts all
        # of them: run.py silences it for this one.)
        stray = [
            name or "model"
            for name, m in self.named_modules()
            if not m.training and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if stray:
            rank_zero_warn(
                f"{len(stray)} trainable module(s) are in eval mode at the start of training "
                f"({', '.join(stray[:5])}{', ...' if len(stray) > 5 else ''}): their dropout and "
                "normalisation run as in evaluation; call .train() on them"
            )
        if self._pending_rng is not None:
            rng.restore(self._pending_rng, self.objective, self.device)
            self._pending_rng = None
