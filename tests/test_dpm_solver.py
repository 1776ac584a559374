"""DPM-Solver++ against closed forms, against DDIM (its first order) and against diffusers'
DPMSolverMultistepScheduler (a second implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from lt_diffusion.diffusion import DDIMSampler, DPMSolverSampler, NoiseSchedule
from lt_diffusion.runs.build import build_sampler, resolve_sampler
from tests.conftest import compose_config


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule(num_timesteps=1000, kind="linear", beta_start=1e-4, beta_end=0.02)


def abar_of(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    return schedule.host64("alphas_cumprod")[t.cpu()].to(torch.float64)[:, None, None, None]


class GaussianData(torch.nn.Module):
    """The exact eps of data ~ N(mu, s^2) per pixel (a point mass for s = 0):
    ``eps(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)``."""

    def __init__(self, schedule: NoiseSchedule, mu: torch.Tensor, s: float) -> None:
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = abar_of(self.schedule, t)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """A smooth, nonlinear, time-dependent stand-in for a network."""
    tt = (t.to(x.dtype) / 1000.0)[:, None, None, None]
    return torch.tanh(0.7 * x + 0.3 * x.roll(1, dims=-1)) * (0.5 + tt) + 0.1 * torch.sin(3 * tt)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [1, 7, 15])
def test_exact_eps_of_a_point_returns_that_point(schedule, order: int, steps: int) -> None:
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 1.6 - 0.8
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = DPMSolverSampler(schedule, steps=steps, order=order)
    out = sampler.sample(GaussianData(schedule, x0, 0.0), noise, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_first_order_is_deterministic_ddim(schedule) -> None:
    noise = torch.randn(3, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3, dtype=torch.long)
    for spacing in ("uniform", "linspace", "trailing"):
        dpm = DPMSolverSampler(schedule, steps=12, order=1, spacing=spacing).sample(
            toy_model, noise, y, clamp=False
        )
        ddim = DDIMSampler(schedule, steps=12, eta=0.0, spacing=spacing).sample(toy_model, noise, y)
        torch.testing.assert_close(dpm.clamp(-1, 1), ddim, rtol=0, atol=1e-10)


def test_second_order_is_far_closer_to_the_exact_ode_on_gaussian_data(schedule) -> None:
    """For N(mu, s^2) data the probability-flow ODE keeps z = (x_t - sqrt(abar) mu) / sqrt(v_t),
    v_t = abar s^2 + 1 - abar. The solver follows it to its last visited timestep t_L and returns
    the x0 prediction there: exactly mu + sqrt(abar_L) s^2 / v_L (x_L - sqrt(abar_L) mu)."""
    mu, s = torch.tensor(0.3, dtype=torch.float64), 0.4
    model = GaussianData(schedule, mu, s)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(4096, 1, 1, 1, dtype=torch.float64, generator=gen)
    y = torch.zeros(len(noise), dtype=torch.long)
    abar = schedule.host64("alphas_cumprod")
    errors = {}
    for order in (1, 2):
        sampler = DPMSolverSampler(schedule, steps=15, order=order)  # the G.10 setting
        a_T, a_L = float(abar[sampler.timesteps[0]]), float(abar[sampler.timesteps[-1]])
        z = (noise - math.sqrt(a_T) * mu) / math.sqrt(a_T * s**2 + 1 - a_T)
        v_L = a_L * s**2 + 1 - a_L
        x_L = math.sqrt(a_L) * mu + math.sqrt(v_L) * z
        truth = mu + math.sqrt(a_L) * s**2 / v_L * (x_L - math.sqrt(a_L) * mu)
        errors[order] = (sampler.sample(model, noise, y, clamp=False) - truth).abs().max().item()
    # Measured: 0.114 (first order, DDIM) and 0.0083 (DPM-Solver++(2M)).
    assert errors[2] < 0.02 and errors[2] < errors[1] / 5, errors


@pytest.mark.parametrize("order", [1, 2])
def test_equals_diffusers_dpm_solver_multistep(schedule, order: int) -> None:
    diffusers = pytest.importorskip("diffusers")  # installed with the `latent` extra
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.host64("betas").numpy(),
        solver_order=order,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=False,  # only the last step (to sigma = 0) is first order
        final_sigmas_type="zero",
    )
    ours = DPMSolverSampler(schedule, steps=15, order=order)
    scheduler.set_timesteps(timesteps=ours.timesteps)
    assert scheduler.timesteps.tolist() == ours.timesteps

    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    for t in scheduler.timesteps:
        tt = torch.full((len(x),), int(t), dtype=torch.long)
        x = scheduler.step(toy_model(x, tt), t, x).prev_sample
    got = ours.sample(toy_model, noise, torch.zeros(2, dtype=torch.long), clamp=False)
    # diffusers keeps its alphas_cumprod in float32: agreement to float32 precision.
    torch.testing.assert_close(got, x.to(torch.float64), rtol=1e-4, atol=1e-4)


def test_guidance_and_config(schedule) -> None:
    cfg = compose_config("train", ["sampler=dpm_solver"])
    sampler = build_sampler(resolve_sampler(cfg.sampler, torch.nn.Identity()), schedule)
    assert isinstance(sampler, DPMSolverSampler) and sampler.num_steps == 15
    assert sampler.clip_denoised  # auto: a pixel model's x0 is clipped
    assert sampler.timesteps[0] == 999 and cfg.sampler.name == "dpm15"
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        DPMSolverSampler(schedule, order=3)
    with pytest.raises(ValueError, match="(?i)unknown .*spacing"):
        DPMSolverSampler(schedule, spacing="karras")


def test_clipped_x0_equals_diffusers_static_thresholding(schedule) -> None:
    from diffusers import DPMSolverMultistepScheduler

    # thresholding with sample_max_value = 1 clamps x0 to [-1, 1] (the quantile is clamped to 1)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        solver_order=2, algorithm_type="dpmsolver++", timestep_spacing="trailing",
        final_sigmas_type="zero", thresholding=True, sample_max_value=1.0,
        dynamic_thresholding_ratio=0.995,
    )  # fmt: skip
    scheduler.set_timesteps(10)
    ours = DPMSolverSampler(schedule, steps=10, order=2, clip_denoised=True)
    loud = lambda x, t, y=None: 3.0 * toy_model(x, t)  # noqa: E731 - x0 predictions leave [-1, 1]
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = noise.clone().float()
    for t in scheduler.timesteps:
        tt = torch.full((len(x),), int(t), dtype=torch.long)
        x = scheduler.step(loud(x, tt), t, x).prev_sample
    got = ours.sample(loud, noise, torch.zeros(2, dtype=torch.long), clamp=False)
    torch.testing.assert_close(got, x.to(torch.float64), rtol=1e-4, atol=1e-4)
    y = torch.zeros(2, dtype=torch.long)
    unclipped = DPMSolverSampler(schedule, steps=10, order=2).sample(loud, noise, y, clamp=False)
    assert (got - unclipped).abs().max() > 0.1  # the clip is active in this case
