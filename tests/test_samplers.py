"""Samplers against oracles (true noise, optimal Gaussian denoiser), closed forms and diffusers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lt_diffusion.diffusion import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    Sampler,
    ddim_timesteps,
    guided_eps,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class TrueNoise(torch.nn.Module):
    """Oracle for a known x0: returns the exact noise that turns x0 into x_t."""

    null_label = 1
    num_classes = 1

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor) -> None:
        super().__init__()
        self.abar = schedule.host64("alphas_cumprod")
        self.x0 = x0

    def forward(self, x, t, y):
        a = self.abar.to(x.dtype)[t].view(-1, *[1] * (x.ndim - 1))
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


class GaussianOracle(torch.nn.Module):
    """Optimal eps for data x0 ~ N(mu, s^2): sqrt(1-a)(x - sqrt(a) mu) / (a s^2 + 1 - a)."""

    null_label = 1
    num_classes = 1

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float) -> None:
        super().__init__()
        self.abar = schedule.host64("alphas_cumprod")
        self.mu, self.s = mu, s

    def forward(self, x, t, y):
        a = self.abar.to(x.dtype)[t].view(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def _abar_np(T: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def _gaussian_ddpm_moments(mu: float, s: float, variance: str) -> tuple[float, float]:
    """Exact mean / std of the ancestral sampler's output for the Gaussian oracle.

    Every step is affine in x plus independent Gaussian noise, so N(m, v) propagates in closed
    form: x0_hat = E[x0 | x_t] = mu + sqrt(a) s^2 (x - sqrt(a) mu) / (a s^2 + 1 - a).
    """
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    m, v = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        a, ap, b = abar[t], abar_prev[t], betas[t]
        gain = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)  # d x0_hat / d x
        c1, c2 = b * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - b) / (1 - a)
        slope = c1 * gain + c2
        offset = c1 * (mu - gain * math.sqrt(a) * mu)
        var = b if variance == "fixed_large" else b * (1 - ap) / (1 - a)
        m, v = slope * m + offset, slope**2 * v + (var if t > 0 else 0.0)  # no noise at t = 0
    return m, math.sqrt(v)


def _gaussian_ddim_map(mu: float, s: float, ts: list[int]) -> tuple[float, float]:
    """DDIM (eta = 0) with the Gaussian oracle is the affine map x_T -> slope x_T + offset."""
    abar = _abar_np()
    slope, offset = 1.0, 0.0
    for i in range(len(ts) - 1, -1, -1):
        a = abar[ts[i]]
        ap = abar[ts[i - 1]] if i > 0 else 1.0
        v = a * s**2 + 1 - a
        # x0_hat = mu + sqrt(a) s^2 (x - sqrt(a) mu)/v ; eps = sqrt(1-a)(x - sqrt(a) mu)/v
        k = math.sqrt(ap) * math.sqrt(a) * s**2 / v + math.sqrt(1 - ap) * math.sqrt(1 - a) / v
        c = math.sqrt(ap) * mu - k * math.sqrt(a) * mu
        slope, offset = k * slope, k * offset + c
    return offset, slope


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize(
    "spacing,diffusers_spacing",
    [("uniform", "leading"), ("linspace", "linspace"), ("trailing", "trailing")],
)
@pytest.mark.parametrize("steps", [1, 10, 50, 100, 1000])
def test_timesteps_equal_diffusers(spacing: str, diffusers_spacing: str, steps: int) -> None:
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(
        num_train_timesteps=1000, timestep_spacing=diffusers_spacing, steps_offset=0
    )
    ref.set_timesteps(steps)
    sampler = DDIMSampler(NoiseSchedule(1000), steps=steps, spacing=spacing)
    assert sampler.timesteps == ref.timesteps.tolist()
    assert sampler.num_steps == steps


def test_uniform_spacing_falls_back_to_exactly_steps_timesteps() -> None:
    ts = ddim_timesteps(1000, 30, "uniform")
    assert len(ts) == 30 and ts[0] == 0
    assert ts == [round(k * 1000 / 30) for k in range(30)]
    assert ddim_timesteps(1000, 50, "uniform") == list(range(0, 1000, 20))
    assert ddim_timesteps(1000, 1000, "trailing") == list(range(1000))


# ----------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("spacing", ["uniform", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_ddim_with_true_noise_oracle_recovers_x0(spacing: str, steps: int) -> None:
    """eta = 0 with eps = the true noise of x0 returns x0 from pure noise, for any schedule."""
    schedule = NoiseSchedule(1000).double()
    g = torch.Generator().manual_seed(steps)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    out = DDIMSampler(schedule, steps=steps, spacing=spacing).sample(
        TrueNoise(schedule, x0), noise, torch.zeros(3, dtype=torch.long)
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spacing", ["uniform", "linspace", "trailing"])
def test_ddim_true_noise_oracle_in_float32(spacing: str) -> None:
    schedule = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    out = DDIMSampler(schedule, steps=50, spacing=spacing).sample(
        TrueNoise(schedule, x0), noise, torch.zeros(4, dtype=torch.long)
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def diffusers_ddim(schedule: NoiseSchedule, steps: int, **settings: Any) -> Any:
    """diffusers' ``DDIMScheduler`` on ``schedule``'s betas (epsilon prediction, no x0 clipping,
    alpha_0 = 1, no offset) with ``steps`` timesteps: the reference to compare with."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(
        num_train_timesteps=schedule.T,
        trained_betas=schedule.host64("betas").numpy(),
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        **settings,
    )
    ref.set_timesteps(steps)
    return ref


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize(
    "spacing,diffusers_spacing",
    [("uniform", "leading"), ("linspace", "linspace"), ("trailing", "trailing")],
)
def test_ddim_step_equals_diffusers(eta: float, spacing: str, diffusers_spacing: str) -> None:
    T, steps = 1000, 20
    schedule = NoiseSchedule(T)
    ref = diffusers_ddim(schedule, steps, timestep_spacing=diffusers_spacing)
    sampler = DDIMSampler(schedule, steps=steps, eta=eta, spacing=spacing)
    g = torch.Generator().manual_seed(1)
    for t in ref.timesteps.tolist():
        x = torch.randn(2, 3, 4, 4, generator=g)
        eps = torch.randn_like(x)
        z = torch.randn_like(x)
        want = ref.step(eps, t, x, eta=eta, variance_noise=z)
        # diffusers always steps to t - T // steps (abar = 1 below 0).
        got, x0 = sampler.step(x, eps, t, max(t - T // steps, -1), noise=z)
        torch.testing.assert_close(got, want.prev_sample, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(x0, want.pred_original_sample, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_loop_equals_diffusers_loop(eta: float) -> None:
    """The whole sampling loop, with the same model and the same per-step noise stream."""
    T, steps = 1000, 25
    schedule = NoiseSchedule(T)
    ref = diffusers_ddim(schedule, steps)

    def model(x, t, y):
        return torch.tanh(x) * 0.5 + 1e-4 * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)

    labels = torch.tensor([0, 2, 1])
    noise = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    got = DDIMSampler(schedule, steps=steps, eta=eta).sample(
        model, noise, labels, generator=torch.Generator().manual_seed(9)
    )
    g = torch.Generator().manual_seed(9)
    x = noise
    for i, t in enumerate(ref.timesteps.tolist()):
        eps = model(x, torch.full((3,), t), labels)
        last = i == len(ref.timesteps) - 1
        z = torch.zeros_like(x) if (last or eta == 0) else torch.randn(x.shape, generator=g)
        x = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-4, atol=3e-5)


def test_ddim_gaussian_oracle_matches_closed_form_and_data() -> None:
    """Deterministic DDIM on N(mu, s^2) data: the exact affine map, and close to the data."""
    mu, s, n = 0.1, 0.2, 4096
    schedule = NoiseSchedule(1000).double()
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std()  # exactly standardised: output moments are the map's
    labels = torch.zeros(n, dtype=torch.long)
    oracle = GaussianOracle(schedule, mu, s)
    for steps, rel_tol in ((50, 0.15), (1000, 0.02)):
        sampler = DDIMSampler(schedule, steps=steps)
        x = sampler.sample(oracle, z, labels)
        assert x.abs().max() < 1  # the final clamp did not act
        mean, std = _gaussian_ddim_map(mu, s, ddim_timesteps(1000, steps, "uniform"))
        assert x.mean().item() == pytest.approx(mean, abs=1e-9)
        assert x.std().item() == pytest.approx(std, rel=1e-7)
        # A finite-step ODE solver shrinks the spread of narrow data (about 12 % at 50 uniform
        # steps for s = 0.2); it converges to the data distribution as the steps grow.
        assert abs(x.mean().item() - mu) < 0.005
        assert abs(x.std().item() / s - 1) < rel_tol, (steps, x.std().item())


# ----------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_gaussian_oracle_samples_the_data_distribution(variance: str) -> None:
    mu, s, n = 0.1, 0.2, 8192
    schedule = NoiseSchedule(1000).double()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    sampler = DDPMSampler(schedule, variance=variance, clip_denoised=False)
    x = sampler.sample(
        GaussianOracle(schedule, mu, s), noise, torch.zeros(n, dtype=torch.long), generator=g
    )
    assert x.abs().max() < 1
    mean, std = x.mean().item(), x.std().item()
    exact_mean, exact_std = _gaussian_ddpm_moments(mu, s, variance)
    se_mean, se_std = exact_std / math.sqrt(n), exact_std / math.sqrt(2 * n)
    assert abs(mean - exact_mean) < 5 * se_mean
    assert abs(std - exact_std) < 5 * se_std
    # The 1000-step chain itself is within 2 % of the data distribution.
    assert abs(exact_mean - mu) < 1e-3 and abs(exact_std / s - 1) < 0.02
    assert abs(mean - mu) < 5 * se_mean + 1e-3
    assert abs(std - s) < 5 * se_std + 0.02 * s


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_trajectory_equals_manual_float64_loop(variance: str, clip: bool) -> None:
    T = 20
    schedule = NoiseSchedule(T, 1e-3, 0.2).double()

    def model(x, t, y):
        return torch.sin(3 * x) + 0.05 * t.view(-1, 1, 1, 1) - 0.2 * y.view(-1, 1, 1, 1)

    labels = torch.tensor([0, 1, 2, 1])
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = DDPMSampler(schedule, variance, clip_denoised=clip).sample(
        model, noise, labels, generator=torch.Generator().manual_seed(1)
    )
    # Independent loop from Ho et al.'s formulas.
    betas = np.linspace(1e-3, 0.2, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    var = np.append(post_var[1], betas[1:] if variance == "fixed_large" else post_var[1:])
    g = torch.Generator().manual_seed(1)
    x = noise
    for t in range(T - 1, -1, -1):
        eps = model(x, torch.full((4,), t), labels)
        if clip:
            x0 = ((x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])).clamp(-1, 1)
            mean = (
                betas[t] * math.sqrt(abar_prev[t]) / (1 - abar[t]) * x0
                + (1 - abar_prev[t]) * math.sqrt(1 - betas[t]) / (1 - abar[t]) * x
            )
        else:
            mean = (x - betas[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(1 - betas[t])
        if t > 0:
            x = mean + math.sqrt(var[t]) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        else:
            x = mean
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-9, atol=1e-10)


def test_variances_follow_ho_et_al_log_variance_arrays() -> None:
    """fixed_large: log([beta~_1, beta_1, ..., beta_{T-1}]); fixed_small: the clipped beta~."""
    schedule = NoiseSchedule(1000)
    large = DDPMSampler(schedule, "fixed_large").sigmas()
    small = DDPMSampler(schedule, "fixed_small").sigmas()
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    post = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # beta~_t for t = 1 .. T-1
    np.testing.assert_allclose(np.square(large[1:]), betas[1:], rtol=1e-12)
    np.testing.assert_allclose(np.square(small[1:]), post, rtol=1e-10)
    # Index 0 (the paper's t = 1) holds beta~_1 in both; it never adds noise (last step).
    assert np.square(large[0]) == pytest.approx(post[0], rel=1e-10)
    assert np.square(small[0]) == pytest.approx(post[0], rel=1e-10)


# ----------------------------------------------------------------------------- guidance


class CountingModel(torch.nn.Module):
    null_label = 4
    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return torch.cos(x) * (1 + y.view(-1, 1, 1, 1)) + 1e-3 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("w", [0.5, 1.6, -1.0])
def test_guided_eps_is_one_call_and_the_formula(w: float) -> None:
    model = CountingModel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 500, 999])
    y = torch.tensor([0, 3, 1])
    got = guided_eps(model, x, t, y, w)
    assert model.batches == [6]
    eps_c = model(x, t, y)
    eps_u = model(x, t, torch.full_like(y, 4))
    torch.testing.assert_close(got, eps_c + w * (eps_c - eps_u))
    if w == -1.0:  # w = -1 is the unconditional model
        torch.testing.assert_close(got, eps_u)


def test_zero_guidance_makes_exactly_one_conditional_call() -> None:
    model = CountingModel()
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 2, 3])
    y = torch.tensor([0, 1, 2])
    got = guided_eps(model, x, t, y, 0.0)
    assert model.batches == [3]
    assert torch.equal(got, model(x, t, y))


def test_sampler_calls_the_model_once_per_step() -> None:
    model = CountingModel()
    x = torch.randn(2, 1, 3, 3)
    DDIMSampler(NoiseSchedule(100), steps=10).sample(model, x, torch.tensor([0, 1]), guidance=1.0)
    assert model.batches == [4] * 10
    model.batches.clear()
    DDPMSampler(NoiseSchedule(30)).sample(model, x, torch.tensor([0, 1]))
    assert model.batches == [2] * 30


def test_sampling_runs_without_autograd_and_shows_progress(capsys) -> None:
    class Net(torch.nn.Module):
        null_label = 2

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x, t, y):
            return self.conv(x)

    model = Net()
    out = DDIMSampler(NoiseSchedule(100), steps=5, eta=1.0).sample(
        model, torch.randn(2, 1, 3, 3), torch.tensor([0, 1]), guidance=0.5, progress=True
    )
    assert not out.requires_grad and out.shape == (2, 1, 3, 3)
    assert out.min() >= -1 and out.max() <= 1
    assert "DDIM5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name,cls,steps",
    [("ddim", DDIMSampler, 50), ("ddim100", DDIMSampler, 100), ("ddpm", DDPMSampler, 1000)],
)
def test_sampler_configs_build(name: str, cls: type, steps: int) -> None:
    schedule = instantiate(OmegaConf.load(CONFIGS / "diffusion" / "linear.yaml"))
    assert isinstance(schedule, NoiseSchedule) and schedule.T == 1000
    cfg = OmegaConf.load(CONFIGS / "sampler" / f"{name}.yaml")
    sampler = instantiate(cfg.sampler)(schedule=schedule)
    assert isinstance(sampler, cls) and isinstance(sampler, Sampler)
    assert sampler.num_steps == steps and cfg.guidance == 0.0 and cfg.name
    if cls is DDPMSampler:
        assert sampler.variance == "fixed_large"


# ----------------------------------------------------------------------------- errors


def test_bad_sampler_settings_are_refused() -> None:
    schedule = NoiseSchedule(100)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, T=100\]"):
        DDIMSampler(schedule, steps=101)
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(schedule, steps=0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got -0.1"):
        DDIMSampler(schedule, eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(schedule, eta=1.5)
    with pytest.raises(ValueError, match="Unknown DDIM spacing 'quadratic'"):
        DDIMSampler(schedule, steps=10, spacing="quadratic")
    with pytest.raises(ValueError, match="Unknown DDPM variance 'learned'"):
        DDPMSampler(schedule, variance="learned")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        DDIMSampler(object())  # type: ignore[arg-type]


def test_bad_sampling_inputs_are_refused() -> None:
    sampler = DDIMSampler(NoiseSchedule(100), steps=5)
    model = CountingModel()
    x = torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        sampler.sample(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        sampler.sample(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="model returned shape"):
        sampler.sample(lambda x, t, y: x[:, :, :2], x, torch.tensor([0, 1]))
    with pytest.raises(AttributeError, match="null_label"):
        sampler.sample(lambda x, t, y: x, x, torch.tensor([0, 1]), guidance=1.0)
    with pytest.raises(ValueError, match="t_prev"):
        sampler.step(x, x, 5, 5)
