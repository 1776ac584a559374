"""Consistency distillation (Song et al., "Consistency Models", ICML 2023, Sec. 4 and
Algorithm 2) from a trained diffusion model of this framework.

The student ``f_theta`` (:mod:`lt_diffusion.diffusion.consistency`: ``f = c_skip x + c_out F``
with ``F`` the backbone on ``(x_t, t, y)``) is trained so that two neighbouring points of one
probability-flow ODE trajectory map to the same output. On the grid ``tau_0 = 0 < ... <
tau_{N-1} = T - 1`` (:func:`karras_timesteps`), per sample::

    n ~ U{0 .. N-2},  x_{n+1} = sqrt(abar) x_0 + sqrt(1 - abar) z       (at tau_{n+1})
    x_n^phi = DDIM step of the teacher from tau_{n+1} to tau_n           (the ODE solver phi)
    L = mean || f_theta(x_{n+1}, tau_{n+1}) - f_theta^-(x_n^phi, tau_n) ||^2
    theta^- <- mu theta^- + (1 - mu) theta                              (after every step)

(eq. 7 with ``lambda = 1`` and ``d`` the squared L2 distance, averaged over pixels as the
framework's losses are; the paper's best CIFAR-10 runs use LPIPS, not offered here). The
deterministic DDIM step is the exact Euler step of the probability-flow ODE in the VE variable
``x_t / sqrt(abar_t)`` (the paper's solver is Heun on EDM's ODE). The teacher is the EMA model
of a framework run (``train.init_from``), frozen and in eval mode; the student starts from the
same weights (the paper does). ``theta^-`` is kept in eval mode (no dropout in the target).

A :class:`Objective`: CM wraps it like any base objective, its ``L_CM`` comparing the
student's backbone outputs with and without the reserved capacity at ``(x_{n+1}, tau_{n+1})``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lt_diffusion.diffusion import NoiseSchedule, Sampler, guided_eps
from lt_diffusion.diffusion.consistency import (
    ConsistencySampler,
    consistency_fn_vp,
    karras_timesteps,
    vp_sigmas,
)
from lt_diffusion.methods.base import (
    NoisedBatch,
    Objective,
    ObjectiveOutput,
    Result,
    RunLoader,
    Step,
    call_model,
    mse,
)
from lt_diffusion.models.ema import ema_update


def ddim_step(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor
) -> Tensor:
    """The deterministic DDIM step from ``t`` to ``t_prev`` (per sample):
    ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps`` with ``x0 = (x_t - sqrt(1 - abar_t) eps) /
    sqrt(abar_t)`` (Song, Meng & Ermon 2021, eq. 12 with sigma = 0; x0 not clipped)."""
    return schedule.q_sample(schedule.predict_x0(x_t, t, eps), t_prev, eps)


class ConsistencyDistillationObjective(Objective):
    """Consistency distillation of a trained eps-prediction teacher.

    Args:
        teacher: the teacher's checkpoint (a framework run's ``last.ckpt``; its EMA weights);
            the method config sets it to ``${train.init_from}``, which also starts the student.
        num_scales: ``N``, the grid size (paper: 18 on CIFAR-10, 40 on ImageNet-64).
        rho: the Karras grid's exponent (paper: 7).
        target_ema: ``mu``, the target network's EMA decay (0: ``theta^- = sg(theta)``).
        teacher_guidance: classifier-free guidance ``w`` of the teacher in the ODE step,
            ``eps = eps_c + w (eps_c - eps_u)`` (as in latent consistency models; 0: the
            conditional teacher). Needs a teacher trained with label dropout.
        cond_drop_prob, cond_drop_mode: label dropout of the student (default none: the
            consistency samplers take no guidance); a dropped label gives the teacher the
            null label too.
    """

    name = "cd"
    passes = 3  # student, target network, teacher

    def __init__(
        self,
        teacher: str | None = None,
        num_scales: int = 18,
        rho: float = 7.0,
        target_ema: float = 0.95,
        teacher_guidance: float = 0.0,
        cond_drop_prob: float = 0.0,
        cond_drop_mode: str = "none",
    ) -> None:
        super().__init__(cond_drop_prob=cond_drop_prob, cond_drop_mode=cond_drop_mode)
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"method.objective.target_ema must be in [0, 1), got {target_ema}")
        if rho <= 0:
            raise ValueError(f"method.objective.rho must be > 0, got {rho}")
        self.teacher_path = teacher
        self.num_scales = int(num_scales)
        self.rho = float(rho)
        self.target_ema = float(target_ema)
        self.teacher_guidance = float(teacher_guidance)
        self.teacher: nn.Module | None = None  # set by bind(); kept out of the module tree
        self.target: nn.Module | None = None  # theta^-, a submodule once bound (checkpointed)
        # Per-schedule tables, made on the first step: sigma_t, the grid and tau_n of tau_{n+1}.
        self.register_buffer("sigmas", torch.zeros(0), persistent=False)
        self.register_buffer("grid", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("prev_t", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def model_output(self) -> str:
        return "consistency"

    def preview_sampler(self, schedule: NoiseSchedule, steps: int, clip_denoised: bool) -> Sampler:
        return ConsistencySampler(schedule, clip_denoised=clip_denoised)

    def set_networks(self, teacher: nn.Module, student: nn.Module) -> None:
        """The frozen teacher and the target network ``theta^-`` (a copy of ``student``)."""
        # Not a submodule: the teacher is in its own checkpoint, not copied into every one.
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.target = copy.deepcopy(student).eval().requires_grad_(False)

    def bind(
        self, model: nn.Module, schedule: NoiseSchedule, load_run: RunLoader | None = None
    ) -> None:
        if load_run is None:
            raise ValueError("consistency distillation is bound with a run loader (its teacher)")
        teacher = check_teacher(self.teacher_path, load_run, model, schedule, self.teacher_guidance)
        self.set_networks(teacher, model)
        self.grid = torch.tensor(karras_timesteps(schedule, self.num_scales, self.rho))

    def train(self, mode: bool = True) -> ConsistencyDistillationObjective:
        super().train(mode)
        if self.target is not None:
            self.target.eval()  # a regression target: no dropout
        return self

    def after_optimizer_step(self, model: nn.Module) -> None:
        ema_update(self.target, model, self.target_ema)

    def _tables(self, schedule: NoiseSchedule, device: torch.device) -> None:
        if self.sigmas.numel() == 0 or self.sigmas.device != device:
            # The schedule's dtype: float32 in training, float64 in the exact tests.
            dtype = schedule.alphas_cumprod.dtype
            self.sigmas = vp_sigmas(schedule).to(device=device, dtype=dtype)
            if self.grid.numel() == 0:  # an objective used without bind() (tests)
                self.grid = torch.tensor(karras_timesteps(schedule, self.num_scales, self.rho))
            self.grid = self.grid.to(device)
            prev = torch.full((schedule.T,), -1, dtype=torch.long, device=device)
            prev[self.grid[1:]] = self.grid[:-1]
            self.prev_t = prev

    def noised(self, x0: Tensor, schedule: NoiseSchedule) -> NoisedBatch:
        """``t = tau_{n+1}`` with ``n ~ U{0 .. N-2}`` (Algorithm 2), ``z ~ N(0, I)``."""
        self._tables(schedule, x0.device)
        n = torch.randint(0, self.grid.numel() - 1, (x0.shape[0],), device=x0.device)
        t = self.grid[n + 1]
        noise = torch.randn_like(x0)
        return NoisedBatch(t=t, noise=noise, x_t=schedule.q_sample(x0, t, noise))

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        if self.teacher is None or self.target is None:
            raise RuntimeError("consistency distillation needs bind(model, schedule) first")
        out = s.predict()  # the student's backbone at (x_{n+1}, tau_{n+1}), with gradient
        f = consistency_fn_vp(s.x_t, s.t, out, self.sigmas)
        with torch.no_grad():
            t_prev = self.prev_t[s.t]
            self.teacher.to(s.x_t.device)  # a no-op after the first step
            eps = guided_eps(self.teacher, s.x_t, s.t, s.y_in, self.teacher_guidance)
            x_prev = ddim_step(schedule, s.x_t, s.t, t_prev, eps.to(s.x_t.dtype))
            target_out = call_model(self.target, x_prev, t_prev, s.y_in, s.aug_labels)
            f_target = consistency_fn_vp(x_prev, t_prev, target_out, self.sigmas)
        loss = mse(f, f_target, per_sample=True).mean()  # float64 stays float64 (tests)
        return ObjectiveOutput(loss, {"cd": loss.detach()}), s.context(out)


def check_teacher(
    path: str | None,
    load_run: RunLoader,
    student: nn.Module,
    schedule: NoiseSchedule,
    guidance: float,
) -> nn.Module:
    """The teacher's EMA model, loaded by ``load_run`` from its checkpoint and checked against
    the student: an eps (diffusion) model of the same schedule, classes and image shape,
    trained with label dropout when guided."""
    if not path:
        raise ValueError(
            "consistency distillation needs a teacher: set train.init_from to a trained "
            "diffusion run's checkpoint (method.objective.teacher follows it)"
        )
    run = load_run(path)
    teacher, cfg, objective = run.model, run.train_cfg, run.objective
    problems: list[str] = []
    if objective.model_output != "eps":
        problems.append(
            f"it is a consistency model (method {cfg.method.name}), not a diffusion model"
        )
    if not torch.equal(run.schedule.host64("alphas_cumprod"), schedule.host64("alphas_cumprod")):
        problems.append(f"its noise schedule differs (diffusion: {dict(cfg.diffusion)})")
    for key in ("num_classes", "in_channels", "image_size"):
        mine, theirs = getattr(student, key, None), getattr(teacher, key, None)
        if mine != theirs:
            problems.append(f"its {key} is {theirs}, the student's {mine}")
    if guidance != 0.0 and not objective.trains_null_label:
        problems.append(
            f"method.objective.teacher_guidance={guidance:g} needs a teacher trained with label "
            "dropout (its null label is untrained)"
        )
    if problems:
        raise ValueError(f"The teacher {path} cannot be distilled: " + "; ".join(problems))
    return teacher
