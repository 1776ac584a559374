"""Consistency models (Song et al. 2023): the consistency function's boundary condition and
scalings (App. C), the distillation target (Algorithm 2 with the DDIM step as the ODE solver),
the 1- and 2-step samplers (Algorithm 1), CM's capacity reservation on the student, and the
checks that keep diffusion and consistency samplers apart. Each against a float64
recomputation written out from the paper's formulas."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.diffusion import DDIMSampler, NoiseSchedule
from lt_diffusion.diffusion.consistency import (
    SIGMA_DATA,
    ConsistencySampler,
    consistency_fn,
    consistency_fn_vp,
    consistency_scalings,
    karras_timesteps,
    vp_sigmas,
)
from lt_diffusion.methods import CMObjective, ConsistencyDistillationObjective, DDPMObjective
from lt_diffusion.models import UNet
from lt_diffusion.models.lowrank import expert_switch, lowrank_layers, reserve_capacity
from lt_diffusion.runs.build import check_sampler, sampler_label
from tests.conftest import compose_config
from tests.objectives import TinyNet, abar_of

SD = SIGMA_DATA


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """``sqrt((1 - abar_t) / abar_t)`` in float64 from the linear betas, (B, 1, 1, 1)."""
    a = abar_of(t)
    return ((1 - a) / a).sqrt()


def f_by_hand(x_ve: torch.Tensor, sigma, sigma_min: float, out: torch.Tensor) -> torch.Tensor:
    """Song et al. App. C with F the EDM-scaled eps denoiser D = x - sigma out, written out:
    F = (D - c_skip^EDM x) / c_out^EDM (Karras et al. 2022, Table 1)."""
    c_skip = SD**2 / ((sigma - sigma_min) ** 2 + SD**2)
    c_out = SD * (sigma - sigma_min) / (SD**2 + sigma**2) ** 0.5
    edm_skip = SD**2 / (sigma**2 + SD**2)
    edm_out = sigma * SD / (sigma**2 + SD**2) ** 0.5
    big_f = (x_ve - sigma * out - edm_skip * x_ve) / edm_out
    return c_skip * x_ve + c_out * big_f


def test_boundary_condition_is_exact() -> None:
    """f(x, sigma_min) = x bit for bit, whatever the network outputs (eq. 5's constraint)."""
    g = torch.Generator().manual_seed(0)
    sigmas = vp_sigmas(NoiseSchedule())
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 1, 4, 4, generator=g).to(dtype) * 5
        out = torch.randn(3, 1, 4, 4, generator=g).to(dtype) * 100
        smin = float(sigmas[0])
        assert torch.equal(consistency_fn(x, smin, smin, out), x)
        table = sigmas.to(dtype)
        t0 = torch.zeros(3, dtype=torch.long)
        x_t = torch.randn(3, 1, 4, 4, generator=g).to(dtype)
        ve = x_t * (1 + table[0] ** 2).sqrt()
        assert torch.equal(consistency_fn_vp(x_t, t0, out, table), ve)
        # Away from the boundary the network matters.
        t5 = torch.full((3,), 5, dtype=torch.long)
        assert not torch.allclose(consistency_fn_vp(x_t, t5, out, table), x_t)


def test_scalings_and_consistency_function_match_the_formulas_in_float64() -> None:
    sigmas = vp_sigmas(NoiseSchedule())
    smin = float(sigmas[0])
    assert smin == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-12)
    for sigma in (smin, 0.05, 0.8, 3.0, 80.0, float(sigmas[-1])):
        c_skip, c_out = consistency_scalings(sigma, smin)
        assert c_skip == pytest.approx(0.25 / ((sigma - smin) ** 2 + 0.25), rel=1e-14)
        assert c_out == pytest.approx(0.5 * (sigma - smin) / math.sqrt(0.25 + sigma**2), abs=1e-15)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) * 3
    out = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.8, 5.0, 150.0], dtype=torch.float64)[:, None, None, None]
    torch.testing.assert_close(
        consistency_fn(x, sigma, smin, out), f_by_hand(x, sigma, smin, out), rtol=1e-12, atol=1e-12
    )
    # Without the sigma_min shift f is the teacher's own denoiser x - sigma eps: a student
    # started from the teacher starts at its x0 prediction.
    torch.testing.assert_close(consistency_fn(x, sigma, 0.0, out), x - sigma * out)


def test_the_distillation_grid_is_karras_on_the_training_timesteps() -> None:
    schedule = NoiseSchedule()
    ts = karras_timesteps(schedule, 18)
    sig = vp_sigmas(schedule).numpy()
    i = np.arange(18)
    lo, hi = sig[0] ** (1 / 7), sig[-1] ** (1 / 7)
    wanted = (lo + i / 17 * (hi - lo)) ** 7
    assert ts == [int(np.argmin(np.abs(np.log(sig) - np.log(w)))) for w in wanted]
    assert ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    with pytest.raises(ValueError, match="num_scales=400"):
        karras_timesteps(schedule, 400)


def _distiller(
    mu: float = 0.5, w: float = 0.0
) -> tuple[ConsistencyDistillationObjective, TinyNet, TinyNet]:
    student, teacher = TinyNet(), TinyNet()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.7).add_(0.1)  # a different network
    obj = ConsistencyDistillationObjective(num_scales=18, target_ema=mu, teacher_guidance=w)
    obj.setup([5, 3, 2])
    obj.set_networks(teacher, student)
    return obj, student, teacher


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_the_distillation_loss_is_a_ddim_step_of_the_teacher_and_the_target_network(w) -> None:
    """Algorithm 2 written out in float64: n ~ U{0..N-2}, x_{n+1} at tau_{n+1}, the teacher's
    DDIM step to tau_n (guided: eps_c + w (eps_c - eps_u)), L = mean(f_theta(x_{n+1}) -
    f_theta^-(x_n^phi))^2."""
    schedule = NoiseSchedule().double()
    obj, student, teacher = _distiller(w=w)
    with torch.no_grad():  # the target network theta^- differs from theta (after some steps)
        obj.target.w.add_(0.05)
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(3)
    out = obj(student, x0, y, schedule)

    grid = torch.tensor(karras_timesteps(schedule, 18))
    torch.manual_seed(3)  # the same draws, in the objective's order: n, then z
    n = torch.randint(0, 17, (6,))
    z = torch.randn_like(x0)
    t1, t0 = grid[n + 1], grid[n]
    a1, a0 = abar_of(t1), abar_of(t0)
    x1 = a1.sqrt() * x0 + (1 - a1).sqrt() * z
    smin = float(sigma_of(torch.tensor([0])))
    with torch.no_grad():
        f_student = f_by_hand(x1 / a1.sqrt(), sigma_of(t1), smin, student.formula(x1, t1, y))
        eps_c = teacher.formula(x1, t1, y)
        eps = eps_c + w * (eps_c - teacher.formula(x1, t1, torch.full_like(y, TinyNet.null_label)))
        # DDIM (eta = 0), equivalently the Euler step x0 + sigma' eps of the VE ODE
        x0_pred = (x1 - (1 - a1).sqrt() * eps) / a1.sqrt()
        x_prev = a0.sqrt() * x0_pred + (1 - a0).sqrt() * eps
        ve = x1 / a1.sqrt() + (sigma_of(t0) - sigma_of(t1)) * eps
        torch.testing.assert_close(x_prev / a0.sqrt(), ve, rtol=1e-10, atol=1e-10)
        target = obj.target.formula(x_prev, t0, y)
        f_target = f_by_hand(x_prev / a0.sqrt(), sigma_of(t0), smin, target)
    expected = (f_student - f_target).pow(2).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert set(out.terms) == {"cd"}
    # The gradient reaches the student only: teacher and target are frozen.
    out.loss.backward()
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0
    assert teacher.w.grad is None and obj.target.w.grad is None


def test_the_target_network_is_an_ema_of_the_student() -> None:
    obj, student, _ = _distiller(mu=0.9)
    before = obj.target.w.detach().clone()
    with torch.no_grad():
        student.w.add_(1.0)
    obj.after_optimizer_step(student)
    torch.testing.assert_close(obj.target.w, 0.9 * before + 0.1 * student.w.detach())
    assert not obj.target.training
    obj.train()
    assert obj.training and not obj.target.training  # no dropout in the target


def test_the_one_step_sampler_is_f_at_sigma_max() -> None:
    schedule = NoiseSchedule().double()
    model = TinyNet()
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    got = ConsistencySampler(schedule).sample(model, noise, y)
    t = torch.full((3,), 999)
    sig_max = sigma_of(t)
    smin = float(sigma_of(torch.tensor([0])))
    with torch.no_grad():  # x_T = sqrt(1 + sigma_max^2) z, the VE image of the VP noise
        want = f_by_hand(noise * (1 + sig_max**2).sqrt(), sig_max, smin, model.formula(noise, t, y))
    torch.testing.assert_close(got, want.clamp(-1, 1), rtol=1e-10, atol=1e-12)


def test_the_two_step_sampler_is_algorithm_1() -> None:
    schedule = NoiseSchedule().double()
    model = TinyNet()
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    sampler = ConsistencySampler(schedule, steps=2, timesteps=[999, 218], clip_denoised=True)
    got = sampler.sample(model, noise, y, generator=torch.Generator().manual_seed(6))

    smin = float(sigma_of(torch.tensor([0])))
    t_max, tau = torch.full((3,), 999), torch.full((3,), 218)
    s_max, s_tau = sigma_of(t_max), sigma_of(tau)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        x_ve = noise * (1 + s_max**2).sqrt()
        x = f_by_hand(x_ve, s_max, smin, model.formula(noise, t_max, y)).clamp(-1, 1)
        x_tau = x + (s_tau**2 - smin**2).sqrt() * z  # Algorithm 1, VE
        vp = x_tau * abar_of(tau).sqrt()  # the network sees VP inputs
        x = f_by_hand(x_tau, s_tau, smin, model.formula(vp, tau, y)).clamp(-1, 1)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12)
    assert sampler_label(OmegaConf.create({"sampler": {
        "_target_": "lt_diffusion.diffusion.consistency.ConsistencySampler", "steps": 2}})
    ) == "consistency2"  # fmt: skip


def test_the_sampler_refuses_timesteps_that_do_not_start_from_noise() -> None:
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="needs sampler.sampler.timesteps"):
        ConsistencySampler(schedule, steps=2)
    with pytest.raises(ValueError, match="descend strictly from T - 1 = 999"):
        ConsistencySampler(schedule, steps=2, timesteps=[900, 200])
    with pytest.raises(ValueError, match="one timestep per step"):
        ConsistencySampler(schedule, steps=3, timesteps=[999, 200])


def _tiny_unet() -> UNet:
    """A small U-Net whose near-zero initial layers (Ho et al.'s output convolution ...) are
    made random, as after training, so that its output is not ~0."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, num_classes=3, ch=8, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.1)
    return net


def test_cm_on_the_consistency_student() -> None:
    """CM wraps consistency distillation: the reserved low-rank capacity starts at zero, so
    the student's full model and theta_g both start at the teacher (L_CM = 0); once B A is
    non-zero the switch changes the student's output and L_CM, and theta_g's is unchanged."""
    teacher = _tiny_unet().eval()
    student = reserve_capacity(copy.deepcopy(teacher), rank_ratio=0.25)
    schedule = NoiseSchedule()
    cd = ConsistencyDistillationObjective(num_scales=10, target_ema=0.0)
    obj = CMObjective(cd)
    obj.setup([6, 3, 1])
    cd.set_networks(teacher, student)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 100, 500, 999])
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        plain = teacher(x, t, y)
        torch.testing.assert_close(student(x, t, y), plain)
        with expert_switch(student, False):
            torch.testing.assert_close(student(x, t, y), plain)
    x0 = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    torch.manual_seed(1)
    out = obj(student, x0, y, schedule)
    assert float(out.terms["cm"]) == 0.0 and float(out.terms["base"]) > 0.0
    with torch.no_grad():
        for layer in lowrank_layers(student):
            layer.lowrank_B.normal_(0, 0.5)
        changed = student(x, t, y)
        with expert_switch(student, False):
            torch.testing.assert_close(student(x, t, y), plain)  # theta_g untouched
    assert (changed - plain).abs().max() > 1e-2 * plain.abs().max()
    torch.manual_seed(1)
    out = obj(student, x0, y, schedule)
    assert float(out.terms["cm"]) != 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(layer.lowrank_B.grad is not None for layer in lowrank_layers(student))
    assert obj.model_output == "consistency" and not obj.trains_null_label


def test_diffusion_and_consistency_samplers_are_not_mixed_up() -> None:
    ddim = OmegaConf.create({"name": "ddim50", "sampler": {
        "_target_": "lt_diffusion.diffusion.DDIMSampler", "steps": 50}})  # fmt: skip
    one = OmegaConf.create({"name": "consistency1", "sampler": {
        "_target_": "lt_diffusion.diffusion.consistency.ConsistencySampler"}})  # fmt: skip
    cd = compose_config("train", ["method=cd"])
    ddpm = compose_config("train", ["method=ddpm"])
    check_sampler(cd, one, "run", "eval.sampler")
    check_sampler(ddpm, ddim, "run", "eval.sampler")
    with pytest.raises(ValueError, match="consistency model .* set eval.sampler to consistency"):
        check_sampler(cd, ddim, "run", "eval.sampler")
    with pytest.raises(ValueError, match="diffusion model .* set sampler to ddim"):
        check_sampler(ddpm, one, "run", "sampler")
    schedule = NoiseSchedule()
    assert isinstance(ConsistencyDistillationObjective().preview_sampler(schedule, 5, True),
                      ConsistencySampler)  # fmt: skip
    assert isinstance(CMObjective(ConsistencyDistillationObjective()).preview_sampler(
        schedule, 5, True), ConsistencySampler)  # fmt: skip
    assert isinstance(CMObjective(DDPMObjective()).preview_sampler(schedule, 5, True), DDIMSampler)
    assert compose_config("train", ["method=cm_cd"]).method.requires_init_from


def test_a_distillation_run_resumes_exactly_and_checks_its_teacher(
    train_overrides, tmp_path
) -> None:
    """Through lt_diffusion.train: a DDPM teacher, then CD from it. The target network is in the
    checkpoint (the teacher is not), so a resumed run equals the uninterrupted one bit for bit;
    a teacher of another noise schedule is refused before the first step."""
    from lt_diffusion.runs.checkpoint import read_checkpoint
    from tests.test_resume import FAST, _train, assert_same_training_state

    _train(train_overrides(*FAST, "train.max_steps=1"), tmp_path / "outputs" / "teacher")
    # As the rows name it: under paths.output_dir, a location that is not part of the run.
    teacher = "${paths.output_dir}/teacher/checkpoints/last.ckpt"
    # channels_last: the target network is converted with the student (a GPU default).
    ov = (*FAST, "method=cd", f"train.init_from={teacher}", "method.objective.target_ema=0.5",
          "method.objective.num_scales=10", "train.ckpt_every=1", "train.channels_last=true")  # fmt: skip
    straight = _train(train_overrides(*ov, "train.max_steps=2"), tmp_path / "a")
    _train(train_overrides(*ov, "train.max_steps=1"), tmp_path / "b")
    resumed = _train(train_overrides(*ov, "train.max_steps=2"), tmp_path / "b")
    assert_same_training_state(straight, resumed)
    state = read_checkpoint(straight)["state_dict"]
    target = {k for k in state if k.startswith("objective.target.")}
    assert target and not any("teacher" in k for k in state)
    # theta^- = EMA of theta with mu = 0.5: it trails the student.
    assert any(not torch.equal(state[k], state["model." + k.split(".", 2)[2]]) for k in target)
    assert (tmp_path / "a" / "samples" / "latest.png").is_file()  # the one-step grid
    with pytest.raises(ValueError, match="noise schedule differs"):
        _train(train_overrides(*ov, "diffusion.beta_end=0.03"), tmp_path / "c")


def test_the_g9_table_trains_its_teachers_first(tmp_path) -> None:
    """cm_table_g9's rows distil cm_table2's DDPM runs: the spec requires them, so one command
    trains them (a first wave) and then the students (a second). Without ``requires`` a table
    is refused up front, naming the missing checkpoint; once it exists it is not."""
    from lt_diffusion.tables import TableSpecError
    from lt_diffusion.tables.launch import check_start_points, launch_waves, plan

    out = [f"paths.output_dir={tmp_path}"]
    _, resolved, jobs = plan(compose_config("sweep", ["table=cm_table_g9", *out]))
    assert len(jobs) == 18 and {r.config.method.name for r in resolved} == {"ddpm", "cd", "cm_cd"}
    teachers = [r for r in resolved if r.config.method.name == "ddpm"]
    assert len(teachers) == 6 and not any(r.records for r in teachers)
    check_start_points(resolved)
    waves = launch_waves(resolved)
    assert [{resolved[i].config.method.name for i in w} for w in waves] == [
        {"ddpm"},
        {"cd", "cm_cd"},
    ]
    assert [len(w) for w in waves] == [6, 12]

    _, resolved, _ = plan(compose_config("sweep", ["table=cm_table_g9", "table.requires=[]", *out]))
    with pytest.raises(TableSpecError, match="cifar10_lt-ir100-ddpm-seed0/checkpoints/last.ckpt"):
        check_start_points(resolved)
    for r in resolved:
        start = Path(r.config.train.init_from)
        start.parent.mkdir(parents=True, exist_ok=True)
        start.touch()
    check_start_points(resolved)
