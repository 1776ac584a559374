"""Focal-style reweighting of the per-sample diffusion loss (after Lin et al. 2017).

The CM paper compares against "Focal" without giving a formula; this is ours. With the
per-sample loss ``l_i = mean_pixels (eps_theta(x_t,i, t_i, y_i) - eps_i)^2``::

    r_i = sg(l_i) / m(t_i)                    (hardness: loss relative to its timestep's usual loss)
    w_i = r_i^gamma / mean_j r_j^gamma        (normalised: the batch-mean weight is 1)
    L   = mean_i w_i l_i

Why relative to the timestep: the epsilon loss of a diffusion model depends far more on t than
on the sample (it is largest near t = 0 and tiny near t = T), so weighting by the raw loss would
mostly re-weight *timesteps* (towards t = 0) rather than emphasise hard *samples*, which is
what focal loss is about (in the long-tailed setting, the tail classes' samples). ``m(t)`` is
an exponential moving average of the mean loss per timestep bucket, kept on the device.
``baseline: batch`` drops the timestep normalisation (``r_i = sg(l_i)``). The normalisation
keeps the loss scale, hence the effective learning rate, that of DDPM (gamma = 0 is DDPM).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, check_choice, mse

BASELINES = ("timestep", "batch")


class FocalObjective(Objective):
    """DDPM loss with per-sample focal weights (see the module docstring).

    Args:
        gamma: focusing exponent (0: plain DDPM).
        baseline: ``"timestep"`` (hardness relative to a running per-timestep mean loss) or
            ``"batch"`` (raw detached loss).
        normalize: divide the weights by their batch mean (mean weight 1); without it the raw
            ``r_i^gamma`` scales the loss.
        num_buckets: timestep buckets of the running mean (``"timestep"`` baseline).
        ema_decay: decay of the running mean per update of a bucket.
        dropout: CFG label dropout (``cond_drop_prob``, ``cond_drop_mode``), see :class:`Objective`.
    """

    name = "focal"

    def __init__(
        self,
        gamma: float = 1.0,
        baseline: str = "timestep",
        normalize: bool = True,
        num_buckets: int = 100,
        ema_decay: float = 0.99,
        **dropout: Any,
    ) -> None:
        super().__init__(**dropout)
        check_choice("baseline", baseline, BASELINES)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if num_buckets < 1 or not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                f"need num_buckets >= 1 and ema_decay in [0, 1), got {num_buckets}, {ema_decay}"
            )
        self.gamma = float(gamma)
        self.baseline = baseline
        self.normalize = bool(normalize)
        self.num_buckets = int(num_buckets)
        self.ema_decay = float(ema_decay)
        # Running mean loss per timestep bucket; saved with the run so a resume continues it.
        self.register_buffer("bucket_loss", torch.zeros(self.num_buckets))
        self.register_buffer("bucket_seen", torch.zeros(self.num_buckets, dtype=torch.bool))

    def bucket(self, t: Tensor, num_timesteps: int) -> Tensor:
        """The running-mean bucket of each timestep, (B,) int64."""
        return (t * self.num_buckets) // num_timesteps

    @torch.no_grad()
    def update_baseline(self, loss: Tensor, t: Tensor, num_timesteps: int) -> Tensor:
        """Fold this batch's per-sample losses into the running means; return ``m(t_i)``."""
        k = self.bucket(t, num_timesteps)
        loss = loss.float()
        # Out of place: under torch.func.vmap (the seed-vectorised training) the sums are
        # per seed, which an in-place add into a fresh unbatched tensor could not be.
        zeros = torch.zeros(self.num_buckets, dtype=loss.dtype, device=loss.device)
        total = zeros.index_add(0, k, loss)
        count = zeros.index_add(0, k, torch.ones_like(loss))
        batch_mean = total / count.clamp_min(1.0)
        hit = count > 0
        old = self.bucket_loss.float()
        # First visit of a bucket: start from the batch mean (no bias towards the zero init).
        blended = torch.where(
            self.bucket_seen, self.ema_decay * old + (1.0 - self.ema_decay) * batch_mean, batch_mean
        )
        new = torch.where(hit, blended, old)
        self.bucket_loss.copy_(new)
        self.bucket_seen.logical_or_(hit)
        return new[k]

    @torch.no_grad()
    def weights(self, loss: Tensor, t: Tensor, num_timesteps: int) -> Tensor:
        """The focal weights ``w_i`` of the per-sample losses ``loss`` (B,), float32."""
        r = loss.detach().float()
        if self.baseline == "timestep":
            r = r / self.update_baseline(r, t, num_timesteps).clamp_min(1e-12)
        w = r.pow(self.gamma)
        if self.normalize:
            w = w / w.mean().clamp_min(1e-12)
        return w

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        eps = s.predict()
        per_sample = mse(eps, s.noise, per_sample=True)
        w = self.weights(per_sample, s.t, schedule.num_timesteps)
        loss = (w * per_sample).mean()
        terms = {
            "focal": loss.detach(),
            "mse": per_sample.detach().mean(),
            "weight_max": w.max(),
        }
        return ObjectiveOutput(loss, terms), s.context(eps)
