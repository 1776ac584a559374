"""The noise schedule against independent float64 numpy computation and forward-process moments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.diffusion.schedule import SCHEDULE_KINDS
from tests.conftest import CONFIG_DIR, compose_config


def _np_linear(T: int = 1000, b0: float = 1e-4, b1: float = 0.02) -> dict[str, np.ndarray]:
    """Reference constants, written out independently of the module (float64)."""
    betas = np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)], dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev}


def test_buffers_equal_float64_numpy() -> None:
    s = NoiseSchedule(1000, 1e-4, 0.02, "linear")
    ref = _np_linear()
    betas, abar, abar_prev = ref["betas"], ref["alphas_cumprod"], ref["alphas_cumprod_prev"]
    expected = {
        "betas": betas,
        "alphas": 1 - betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar**0.5,
        "sqrt_one_minus_alphas_cumprod": (1 - abar) ** 0.5,
        "sqrt_recip_alphas_cumprod": abar**-0.5,
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1) ** 0.5,
        "posterior_variance": betas * (1 - abar_prev) / (1 - abar),
    }
    for name, value in expected.items():
        buf = getattr(s, name)
        assert buf.dtype == torch.float32 and buf.shape == (1000,), name
        # float32 storage of a float64 computation: relative error at float32 resolution.
        np.testing.assert_allclose(buf.numpy(), value, rtol=2e-7, atol=1e-12, err_msg=name)
    assert s.T == 1000 and s.num_timesteps == 1000
    # Spot values of Ho et al.'s schedule: abar_{T-1} ~ 4.04e-5.
    assert abs(s.alphas_cumprod[-1].item() - 4.0358e-5) < 1e-8


def test_buffers_follow_the_module_and_stay_out_of_checkpoints() -> None:
    s = NoiseSchedule(10)
    assert s.state_dict() == {}
    d = s.double()
    assert d.alphas_cumprod.dtype == torch.float64
    assert {name for name, _ in s.named_buffers()} >= {"betas", "alphas_cumprod"}


def test_cosine_schedule_matches_closed_form() -> None:
    T = 1000
    s = NoiseSchedule(T, kind="cosine")

    def f(t: float) -> float:
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    ref = np.array([f(t + 1) / f(0) for t in range(T)])
    # Away from the end, where betas are not clipped at 0.999, abar_t = f(t+1) / f(0).
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[:990], ref[:990], rtol=1e-5)
    assert s.betas.max().item() <= 0.999 + 1e-7


def test_q_sample_moments() -> None:
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 2, 3, 3, generator=g) * 2 - 1
    n = 20000
    for t_val in (0, 10, 250, 600, 999):
        t = torch.full((n,), t_val, dtype=torch.long)
        eps = torch.randn(n, 2, 3, 3, generator=g)
        x_t = s.q_sample(x0.expand(n, -1, -1, -1), t, eps).double()
        abar = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t_val])
        mean_err = (x_t.mean(0) - abar**0.5 * x0[0].double()).abs().max().item()
        var_err = (x_t.var(0) - (1 - abar)).abs().max().item()
        # 5 standard errors of a mean / a variance of n Gaussian draws (18 coordinates).
        assert mean_err < 5 * math.sqrt((1 - abar) / n), (t_val, mean_err)
        assert var_err < 5 * (1 - abar) * math.sqrt(2 / n), (t_val, var_err)


def test_q_sample_is_the_formula_exactly() -> None:
    s = NoiseSchedule(1000).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 500, 998, 999])
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.q_sample(x0, t, eps), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    # predict_x0 inverts q_sample.
    torch.testing.assert_close(s.predict_x0(s.q_sample(x0, t, eps), t, eps), x0)


def test_gather_broadcasts() -> None:
    s = NoiseSchedule(100)
    t = torch.tensor([3, 7])
    out = s.gather(s.betas, t, 4)
    assert out.shape == (2, 1, 1, 1)
    assert torch.equal(out.flatten(), s.betas[t])
    assert s.gather(s.betas, t, 2).shape == (2, 1)


def test_posterior_matches_bayes_closed_form() -> None:
    """q(x_{t-1} | x_t, x_0) from the product of two Gaussians, in float64."""
    s = NoiseSchedule(1000).double()
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 2, 50, 500, 999])
    x0 = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    beta = s.betas[t].view(-1, 1, 1, 1)
    alpha = 1 - beta
    abar_prev = s.alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    # x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta);  x_{t-1} | x0 ~ N(sqrt(abar_prev) x0, 1-abar_prev)
    precision = alpha / beta + 1 / (1 - abar_prev)
    var = 1 / precision
    mean = var * (alpha.sqrt() * x_t / beta + abar_prev.sqrt() * x0 / (1 - abar_prev))
    torch.testing.assert_close(s.posterior_mean(x0, x_t, t), mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s.posterior_variance[t], var.flatten(), rtol=1e-6, atol=0)
    # At t = 0 the posterior is a point mass; its log variance is clipped to the t = 1 value.
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(s.posterior_variance[1].item()), rel=1e-6
    )


def test_reverse_mean_equals_ho_et_al_form() -> None:
    s = NoiseSchedule(1000).double()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 300, 999])
    x_t = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    beta = s.betas[t].view(-1, 1, 1, 1)
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    ref = (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
    torch.testing.assert_close(s.reverse_mean(x_t, t, eps), ref, rtol=1e-5, atol=1e-6)
    # Clipping replaces x0 by its clipped value inside the posterior mean.
    x0c = s.predict_x0(x_t, t, eps).clamp(-1, 1)
    torch.testing.assert_close(
        s.reverse_mean(x_t, t, eps, clip_denoised=True), s.posterior_mean(x0c, x_t, t)
    )


def test_sample_t_is_uniform_and_seeded() -> None:
    s = NoiseSchedule(1000)
    t = s.sample_t(200000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (200000,)
    assert t.min().item() == 0 and t.max().item() == 999
    counts = torch.bincount(t, minlength=1000).double()
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum().item()
    assert chi2 < 999 + 6 * math.sqrt(2 * 999)  # chi-square with 999 dof, ~6 sigma
    again = s.sample_t(200000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_timesteps": 1}, "num_timesteps"),
        ({"num_timesteps": 10.5}, "integer"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "beta_start < beta_end"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"kind": "quadratic"}, "Unknown noise schedule kind 'quadratic'"),
    ],
)
def test_bad_schedule_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


# (our kind, diffusers' beta_schedule, beta_start, beta_end) for the schedules both define.
DIFFUSERS_SCHEDULES = [
    ("linear", "linear", 1e-4, 0.02),  # Ho et al.
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),  # Stable Diffusion 1.x
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),  # Nichol & Dhariwal (betas ignored)
]


@pytest.mark.parametrize("kind,theirs,b0,b1", DIFFUSERS_SCHEDULES)
def test_schedule_matches_diffusers(kind: str, theirs: str, b0: float, b1: float) -> None:
    """The float64 constants against diffusers' DDPMScheduler, which builds them in float32."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=theirs)
    s = NoiseSchedule(1000, b0, b1, kind)
    # Betas: float32 rounding of diffusers' values; alphas_cumprod: their float32 cumprod over
    # 1000 steps drifts by up to ~1e-5 relative where abar is tiny (cosine's last steps).
    np.testing.assert_allclose(s.host64("betas"), ref.betas.double(), rtol=5e-7, atol=0)
    np.testing.assert_allclose(
        s.host64("alphas_cumprod"), ref.alphas_cumprod.double(), rtol=3e-5, atol=0
    )


def test_scaled_linear_is_the_square_of_a_linear_root() -> None:
    b0, b1 = 0.00085, 0.012
    s = NoiseSchedule(1000, b0, b1, "scaled_linear")
    ref = [(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / 999) ** 2 for i in range(1000)]
    np.testing.assert_allclose(s.host64("betas"), ref, rtol=1e-13)
    assert s.host64("betas")[0] == pytest.approx(b0) and s.host64("betas")[-1] == pytest.approx(b1)
    # Not the linear schedule with the same ends: the middle betas are smaller.
    assert s.host64("betas")[500] < (b0 + b1) / 2 - 1e-4


@pytest.mark.parametrize(
    "option", sorted(p.stem for p in (Path(CONFIG_DIR) / "diffusion").glob("*.yaml"))
)
def test_every_diffusion_config_builds(option: str) -> None:
    """Each option of the ``diffusion`` group names a known kind and builds (every composed
    experiment's schedule is built in tests/test_configs.py)."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "diffusion" / f"{option}.yaml")
    assert cfg.kind in SCHEDULE_KINDS
    schedule = instantiate(cfg)
    assert isinstance(schedule, NoiseSchedule) and schedule.kind == cfg.kind


def test_stable_diffusion_rows_train_with_stable_diffusions_schedule() -> None:
    """CM Table 6's rows fine-tune miniSD: its schedule must be SD's own (scaled_linear,
    0.00085 .. 0.012, T = 1000), the one diffusers' StableDiffusionPipeline trains with."""
    from diffusers import DDPMScheduler

    cfg = compose_config("train", ["experiment=cm/artbench10_ir100_cm"])
    schedule = instantiate(cfg.diffusion)
    assert (schedule.kind, schedule.T) == ("scaled_linear", 1000)
    sd = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    np.testing.assert_allclose(schedule.host64("betas"), sd.betas.double(), rtol=5e-7)
    assert dict(cfg.model.schedule) == {
        "num_timesteps": 1000, "kind": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012
    }  # fmt: skip
