"""The objective interface: a method *is* its training objective (DESIGN.md, step 3).

An objective receives the (possibly compiled) model, a clean batch and the noise schedule and
returns the loss plus named terms to log. Methods compose by wrapping a base objective (CM
wraps DDPM, CBDM or OC): the wrapper calls the base's :meth:`Objective.compute`, which returns
the loss with the :class:`Step` it computed on. Classifier-free-guidance label dropout lives here, once, because every
method but IMBA (which replaces it) uses it the same way.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lt_diffusion.diffusion import DDIMSampler, NoiseSchedule, Sampler
from lt_diffusion.utils import draws

DROP_MODES = ("batch", "sample", "none")


def check_choice(
    key: str, value: str, choices: Sequence[str], where: str = "method.objective"
) -> str:
    """``value`` when it is one of ``choices``, else an error naming the setting
    ``<where>.<key>``."""
    if value not in choices:
        raise ValueError(f"{where}.{key} must be one of {list(choices)}, got {value!r}")
    return value


class TrainedRun(Protocol):
    """What an objective reads of another trained run (a distillation teacher): handed in by
    the training (:func:`lt_diffusion.runs.load.load_run`), so that methods sit below runs."""

    model: nn.Module
    train_cfg: Any
    schedule: NoiseSchedule
    objective: Objective


RunLoader = Callable[[str], TrainedRun]


@dataclass
class ObjectiveOutput:
    """A training loss and its named parts (detached tensors, logged without a host sync)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class NoisedBatch:
    """One forward-process draw: timesteps, the true noise and the noised images."""

    t: Tensor
    noise: Tensor
    x_t: Tensor


class Objective(nn.Module):
    """Base class of every method's objective.

    Args:
        cond_drop_prob: probability of replacing the label by the null label (CFG training).
        cond_drop_mode: ``"batch"`` drops the whole batch at once (CBDM / OC code),
            ``"sample"`` drops each sample independently, ``"none"`` never drops.
    """

    name: str = "objective"
    # Denoiser passes per training example this objective adds (a wrapper adds its own to its
    # base's), on a step that keeps the condition: an estimate of a run's cost, by which a table
    # starts its costliest jobs first. tests/test_objective_passes.py counts them.
    passes: int = 1

    def __init__(self, cond_drop_prob: float = 0.1, cond_drop_mode: str = "batch") -> None:
        super().__init__()
        check_choice("cond_drop_mode", cond_drop_mode, DROP_MODES)
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.cond_drop_prob = float(cond_drop_prob)
        self.cond_drop_mode = cond_drop_mode
        # The batch-level coin is a host-side RNG: drawing it on the device would force a sync.
        self._host_rng = random.Random(0)
        self.register_buffer("class_counts", torch.zeros(0), persistent=False)

    def setup(self, class_counts: Sequence[int], seed: int = 0) -> None:
        """Give the objective the training class counts (class 0 the most frequent)."""
        self.class_counts = torch.as_tensor(list(class_counts), dtype=torch.float32).to(
            self.class_counts.device
        )
        self._host_rng = random.Random(seed)

    def host_rng_state(self) -> dict[str, tuple]:
        """The host RNG state of this objective and of every objective it wraps (CM, CORAL,
        ADA ...), by module name, for checkpoints (resuming continues the same coin flips)."""
        return {name: m._host_rng.getstate() for name, m in self._objectives()}

    def load_host_rng_state(self, state: dict[str, tuple]) -> None:
        """Restore what :meth:`host_rng_state` returned."""
        mine = dict(self._objectives())
        if set(state) != set(mine):
            raise ValueError(
                f"checkpoint holds host RNG states for objectives {sorted(state)}, this method "
                f"has {sorted(mine)}: it was written by another method"
            )
        for name, m in mine.items():
            m._host_rng.setstate(state[name])

    def _objectives(self) -> list[tuple[str, Objective]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Objective)]

    @property
    def class_freq(self) -> Tensor:
        """Empirical training class frequency q(y)."""
        if self.class_counts.numel() == 0:
            raise RuntimeError("objective.setup(class_counts) must be called before training")
        return self.class_counts / self.class_counts.sum()

    def noised(self, x0: Tensor, schedule: NoiseSchedule) -> NoisedBatch:
        """Draw t ~ U{0..T-1} and eps ~ N(0, I), return x_t (the draws of
        :mod:`lt_diffusion.utils.draws`: torch's own unless a keyed source is active)."""
        t = draws.randint(0, schedule.num_timesteps, (x0.shape[0],), x0.device)
        noise = draws.randn_like(x0)
        return NoisedBatch(t=t, noise=noise, x_t=schedule.q_sample(x0, t, noise))

    def drop_condition(self, y: Tensor, null_label: int) -> tuple[Tensor, bool]:
        """Apply CFG label dropout. Returns the labels to feed and whether the whole batch was
        dropped (methods with a class-dependent regulariser skip it on such batches)."""
        if self.cond_drop_prob == 0.0 or self.cond_drop_mode == "none":
            return y, False
        if self.cond_drop_mode == "batch" and draws.active():
            # A keyed source (the seed-vectorised training) has no host coin per seed: one
            # device coin drops the whole batch, and the methods' masks of null-label samples
            # (CBDM, CM, CORAL, Overlap) then leave their class-dependent terms at exactly 0,
            # as skipping them on a dropped batch does.
            coin = draws.rand((), y.device) < self.cond_drop_prob
            return torch.where(coin, torch.full_like(y, null_label), y), False
        if self.cond_drop_mode == "batch":
            if self._host_rng.random() < self.cond_drop_prob:
                return torch.full_like(y, null_label), True
            return y, False
        keep = draws.rand(y.shape, y.device) >= self.cond_drop_prob
        return torch.where(keep, y, torch.full_like(y, null_label)), False

    @property
    def trains_null_label(self) -> bool:
        """Whether training teaches the model its null label, which classifier-free guidance
        needs: label dropout here, or the wrapped base objective's."""
        base = self._base()
        if base is not None:
            return base.trains_null_label
        return self.cond_drop_prob > 0.0 and self.cond_drop_mode != "none"

    def _base(self) -> Objective | None:
        base = getattr(self, "base", None)
        return base if isinstance(base, Objective) else None

    @property
    def model_output(self) -> str:
        """What the trained network's output means: ``"eps"`` (a noise prediction, for the
        diffusion samplers) or ``"consistency"`` (a consistency model's backbone output, for
        ``sampler=consistency``); a wrapper's is its base objective's."""
        base = self._base()
        return base.model_output if base is not None else "eps"

    def bind(
        self, model: nn.Module, schedule: NoiseSchedule, load_run: RunLoader | None = None
    ) -> None:
        """Called once by the training module with the live backbone, the schedule and a run
        loader, before the first step and before a resumed checkpoint's state is loaded: where
        an objective that keeps networks of its own (consistency distillation's teacher and
        target) makes them. A wrapper binds its base objective."""
        base = self._base()
        if base is not None:
            base.bind(model, schedule, load_run)

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called by the training module after every optimizer step (a target network's EMA)."""
        base = self._base()
        if base is not None:
            base.after_optimizer_step(model)

    def preview_sampler(self, schedule: NoiseSchedule, steps: int, clip_denoised: bool) -> Sampler:
        """The sampler of the training's sample grids: DDIM in ``steps`` steps for a diffusion
        model; a consistency objective returns its own."""
        base = self._base()
        if base is not None:
            return base.preview_sampler(schedule, steps, clip_denoised)
        return DDIMSampler(schedule, steps=steps, clip_denoised=clip_denoised)

    # A method implements :meth:`loss` on the step :meth:`compute` starts (a forward draw with
    # CFG dropout); ``drops_labels = False`` for a method that trains the null label itself
    # (IMBA). Calling the objective returns only the loss; a wrapper calls ``compute``.
    drops_labels = True

    def begin(
        self,
        model: Model,
        x0: Tensor,
        schedule: NoiseSchedule,
        y: Tensor,
        aug_labels: Tensor | None = None,
    ) -> Step:
        """Draw ``t``, the noise and ``x_t``, and apply CFG label dropout (not for methods that
        train the null label themselves)."""
        b = self.noised(x0, schedule)
        y_in, dropped = (y, False)
        if self.drops_labels:
            y_in, dropped = self.drop_condition(y, model.null_label)
        return Step(model, b.x_t, b.t, b.noise, y_in, dropped, aug_labels)

    def compute(
        self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Aug = None
    ) -> Result:
        """The loss and named terms, plus this step (:class:`Step`) for a wrapper.

        ``aug_labels`` (B, augment_dim), when given, is passed to every model call (ADA).
        """
        return self.loss(self.begin(model, x0, schedule, y, aug_labels), x0, y, schedule)

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        """The method's loss on the step ``s`` (``x0``, ``y``: the clean batch)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Any:
        return self.compute(model, x0, y, schedule)[0]


def mse(a: Tensor, b: Tensor, per_sample: bool = False) -> Tensor:
    """Mean squared error, over everything or per sample (shape (B,)), in at least float32
    (bf16 autocast outputs are upcast; float64 stays float64)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    sq = (a.to(dtype) - b.to(dtype)).pow(2)
    return sq.flatten(1).mean(1) if per_sample else sq.mean()


def call_model(
    model: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor, aug_labels: Tensor | None
) -> Tensor:
    """``model(x, t, y)``, with ``aug_labels=`` only when there are any, so backbones without
    the ADA hook (and the exact sampling-time call) are unaffected."""
    if aug_labels is None:
        return model(x, t, y)
    return model(x, t, y, aug_labels=aug_labels)


def call_model_labels(
    model: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    labels: Sequence[Tensor],
    aug_labels: Tensor | None,
    fused: bool = True,
) -> tuple[Tensor, ...]:
    """The predictions for each of ``labels`` on the same ``(x, t)``: one forward over the
    concatenated batch when ``fused`` (one kernel per layer; the same numbers up to
    batch-dependent kernels), else one forward per label."""
    if not fused or len(labels) == 1:
        return tuple(call_model(model, x, t, y, aug_labels) for y in labels)
    k = len(labels)
    aug = None if aug_labels is None else torch.cat([aug_labels] * k)
    out = call_model(model, torch.cat([x] * k), torch.cat([t] * k), torch.cat(list(labels)), aug)
    return out.chunk(k)


@dataclass
class Step:
    """One training step of an objective: the forward-process draw (``x_t``, ``t``, ``noise``),
    the labels fed to the model after CFG dropout (``y_in``; ``dropped``: the whole batch's
    condition was dropped) and ADA's augmentation labels; its methods call the model on that
    draw. :meth:`context` adds what the step computed, which a wrapping objective (CM, ADA,
    CORAL) reads: CM compares the base's prediction with its reserved-capacity-free part's on
    the same draw and labels."""

    model: Callable[..., Tensor]
    x_t: Tensor
    t: Tensor
    noise: Tensor
    y_in: Tensor
    dropped: bool
    aug_labels: Tensor | None
    # What the step computed, for a wrapping objective (set by :meth:`context`): the model's
    # prediction (with gradient) and what it was regressed onto (the noise; OC's target).
    eps_pred: Tensor | None = None
    target: Tensor | None = None

    def predict(self, labels: Tensor | None = None) -> Tensor:
        """``eps_theta(x_t, t, labels)`` (default: ``y_in``)."""
        y = self.y_in if labels is None else labels
        return call_model(self.model, self.x_t, self.t, y, self.aug_labels)

    def predict_labels(self, labels: Sequence[Tensor], fused: bool) -> tuple[Tensor, ...]:
        """``eps_theta(x_t, t, y)`` for each ``y`` of ``labels`` (:func:`call_model_labels`)."""
        return call_model_labels(self.model, self.x_t, self.t, labels, self.aug_labels, fused)

    def context(
        self, eps: Tensor, target: Tensor | None = None, y_in: Tensor | None = None
    ) -> Step:
        """This step with its prediction ``eps`` and ``target`` (default: the noise) for a
        wrapping objective; ``y_in``: the labels the prediction was made with, if others."""
        return dataclasses.replace(
            self,
            eps_pred=eps,
            target=self.noise if target is None else target,
            y_in=self.y_in if y_in is None else y_in,
        )

    def plain(self, term: str, *zeros: str) -> tuple[ObjectiveOutput, Step]:
        """The DDPM loss of this step alone, logged as ``term`` (``zeros``: the method's other
        terms, 0 here): what class-dependent methods fall back to on a dropped batch."""
        eps = self.predict()
        loss = mse(eps, self.noise)
        terms = {term: loss.detach(), **{z: torch.zeros((), device=loss.device) for z in zeros}}
        return ObjectiveOutput(loss, terms), self.context(eps)


Model = Callable[..., Tensor]
Aug = Tensor | None  # ADA's augmentation labels (B, augment_dim), or none
Result = tuple[ObjectiveOutput, Step]
