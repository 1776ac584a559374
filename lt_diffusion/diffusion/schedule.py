"""The forward (noising) process of a discrete-time Gaussian diffusion (Ho et al. 2020).

Notation: ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, timesteps indexed ``0 .. T-1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")

# Names of the per-timestep buffers, all of shape (T,).
BUFFER_NAMES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear"
) -> np.ndarray:
    """The float64 beta sequence of length ``num_timesteps``.

    ``"linear"``: ``linspace(beta_start, beta_end, T)`` (Ho et al.).
    ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T)^2``, the schedule of
    latent diffusion / Stable Diffusion 1.x (Rombach et al. 2022, ``beta_start = 0.00085``,
    ``beta_end = 0.012``; diffusers' ``beta_schedule="scaled_linear"``).
    ``"cosine"``: Nichol & Dhariwal (2021), ``abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)``
    with ``s = 0.008``, ``beta_t = min(1 - abar(t+1)/abar(t), 0.999)``; it ignores
    ``beta_start`` / ``beta_end``.
    """
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if kind == "scaled_linear":
        root = np.linspace(
            math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64
        )
        return root**2
    if kind == "cosine":
        s = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        # The clip keeps the last steps from having beta = 1 (abar_T = 0 exactly).
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise ValueError(
        f"Unknown noise schedule kind {kind!r}: use one of {SCHEDULE_KINDS} "
        "(set diffusion.kind in the config)"
    )


class NoiseSchedule(nn.Module):
    """Per-timestep constants of the diffusion and the closed-form operations built on them.

    Every constant is computed in float64 and stored as a float32 buffer, so the schedule
    follows ``.to(device)`` with its owner; a dtype change (``.double()``) re-derives the
    buffers from the float64 values. The buffers are not persistent: they are rebuilt from
    the config and never enter a checkpoint. :meth:`host64` gives the float64 values.

    Args:
        num_timesteps: T, the number of diffusion steps (>= 2).
        beta_start: beta of the first step (linear and scaled_linear kinds).
        beta_end: beta of the last step (linear and scaled_linear kinds).
        kind: ``"linear"`` (Ho et al.), ``"scaled_linear"`` (Stable Diffusion) or
            ``"cosine"`` (Nichol & Dhariwal); see :func:`make_betas`.
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        kind: str = "linear",
    ) -> None:
        super().__init__()
        if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps:
            raise ValueError(f"diffusion.num_timesteps must be an integer, got {num_timesteps!r}")
        if num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps must be >= 2, got {num_timesteps}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(
                "diffusion betas must satisfy 0 < beta_start < beta_end < 1, got "
                f"beta_start={beta_start}, beta_end={beta_end} (Ho et al. use 1e-4 and 0.02)"
            )
        self.T = int(num_timesteps)
        self.kind = kind
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)

        betas = make_betas(self.T, self.beta_start, self.beta_end, kind)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        consts = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            # The posterior variance is 0 at t = 0; Ho et al. clip its log with the t = 1 value.
            "posterior_log_variance_clipped": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        assert tuple(consts) == BUFFER_NAMES
        # float64 masters on the host: the samplers read their per-step scalars from these
        # (1 - abar near t = 0 loses digits when taken from float32), and a dtype change of the
        # module re-derives the buffers from them instead of from the float32 rounding.
        self._f64 = {name: torch.from_numpy(value) for name, value in consts.items()}
        for name, value in consts.items():
            self.register_buffer(name, torch.from_numpy(value).to(torch.float32), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NoiseSchedule:
        out = super()._apply(fn, recurse)
        for name in BUFFER_NAMES:
            buf = getattr(self, name)
            if buf.is_floating_point():
                setattr(self, name, self._f64[name].to(device=buf.device, dtype=buf.dtype))
        return out

    def host64(self, name: str) -> Tensor:
        """The float64 CPU value of constant ``name`` (one of :data:`BUFFER_NAMES`)."""
        if name not in self._f64:
            raise KeyError(f"unknown schedule constant {name!r}; known: {BUFFER_NAMES}")
        return self._f64[name]

    @property
    def num_timesteps(self) -> int:
        """T (alias)."""
        return self.T

    def extra_repr(self) -> str:
        return f"T={self.T}, kind={self.kind!r}, beta_start={self.beta_start}, beta_end={self.beta_end}"

    @staticmethod
    def gather(buf: Tensor, t: Tensor, ndim: int) -> Tensor:
        """``buf[t]`` reshaped to ``(B, 1, ..., 1)`` with ``ndim`` dims, to broadcast over x."""
        return buf[t].reshape(-1, *([1] * (ndim - 1)))

    def sample_t(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Timesteps drawn uniformly from ``{0, ..., T-1}``, int64 of shape ``(batch,)``."""
        return torch.randint(0, self.T, (batch,), device=device, generator=generator)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw from ``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        a = self.gather(self.sqrt_alphas_cumprod, t, x0.ndim)
        s = self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return a * x0 + s * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert the forward process: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        a = self.gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim)
        b = self.gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)
        return a * x_t - b * eps

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 7)."""
        c1 = self.gather(self.posterior_mean_coef1, t, x_t.ndim)
        c2 = self.gather(self.posterior_mean_coef2, t, x_t.ndim)
        return c1 * x0 + c2 * x_t

    def reverse_mean(
        self, x_t: Tensor, t: Tensor, eps: Tensor, clip_denoised: bool = False
    ) -> Tensor:
        """``mu_theta(x_t, t)``: the posterior mean at the x0 implied by ``eps``.

        Without clipping this equals ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``.
        With ``clip_denoised`` the predicted x0 is clipped to ``[-1, 1]`` first (Ho et al.'s
        sampler).
        """
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return self.posterior_mean(x0, x_t, t)
