"""IMBA loss (the IMBA-loss paper, ICCV 2025, Sec. 3 / Algorithm 1).

With ``eps_c = eps_theta(x_t, y, t)``, ``eps_u = eps_theta(x_t, null, t)`` and the true noise
``eps``, the *IMBA distance* is ``D = sg(|eps - eps_u|)^gamma``, a proxy of the inverse
frequency of the concept a token shows. For a pixel U-Net a token is a pixel position, so with
the default (token, elementwise) reading::

    D[b, h, w] = mean_c |eps - eps_u|[b, c, h, w] ** gamma
    L*  = mean_{b,h,w}( D[b,h,w] * mean_c (eps - eps_c)[b, c, h, w]^2 )
    L_u = mean (eps - eps_u)^2
    L   = lam L* + (1 - lam) L_u

The unconditional branch is trained on every sample (weight ``1 - lam``), which *replaces*
random label dropout (``cond_drop_prob = 0``).

**Multi-concept captions** (the paper's own setting: text-to-image data where each image holds
several concepts, each in its own region). With ``concepts_per_caption = K > 1`` on a
text-to-image backbone (``model=sd_lora``), each training sample is composed from ``K`` samples
of the batch (:func:`concept_collage`): ``K`` side-by-side vertical strips of their latents,
captioned with the ``K`` classes' prompts joined (labels ``(B, K)``, see
``StableDiffusionBackbone.caption``). The token (latent position) weights ``D`` then differ
between the regions of a frequent and a rare concept within one image, which is what the paper
argues makes token-level balancing better than a weight per sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, mse

IMBA_GRANULARITIES = ("token", "sample")
IMBA_POWERS = ("elementwise", "after_mean")
IMBA_NORMALIZE = ("none", "batch_mean")


def imba_distance(
    noise: Tensor,
    eps_uncond: Tensor,
    gamma: float = 0.8,
    granularity: str = "token",
    power: str = "elementwise",
) -> Tensor:
    """The IMBA distance (IMBA paper, ``D = ||eps - eps_theta(x_t, null, t)||^gamma``).

    A point ``(B, D)`` of the synthetic benchmark is one token with ``D`` channels, so both
    granularities give one weight per sample there.

    Args:
        noise: the true noise ``eps``, (B, C, H, W) (or (B, D)).
        eps_uncond: the unconditional prediction ``eps_theta(x_t, null, t)``, same shape.
        gamma: the exponent (paper: 0.8).
        granularity: ``"token"``: one weight per pixel position, (B, H, W), the mean over
            channels; ``"sample"``: one weight per image, (B,), the mean over C, H, W.
        power: ``"elementwise"``: ``mean |d|^gamma`` (the paper's (B, N, C) distance averaged
            over channels); ``"after_mean"``: ``(mean |d|)^gamma``.

    Returns the distance in at least float32, *without* a stop-gradient (callers detach).
    """
    if granularity not in IMBA_GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {IMBA_GRANULARITIES}, got {granularity!r}: set "
            "method.objective.granularity accordingly"
        )
    if power not in IMBA_POWERS:
        raise ValueError(
            f"power must be one of {IMBA_POWERS}, got {power!r}: set method.objective.power"
        )
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if noise.shape != eps_uncond.shape or noise.ndim < 2:
        raise ValueError(
            f"noise and eps_uncond must both be (B, C, H, W) (or (B, D) points), got "
            f"{tuple(noise.shape)} and {tuple(eps_uncond.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(noise.dtype, eps_uncond.dtype), torch.float32)
    d = (noise.to(dtype) - eps_uncond.to(dtype)).abs()
    dims = (1,) if granularity == "token" else tuple(range(1, noise.ndim))
    if power == "elementwise":
        return d.pow(gamma).mean(dim=dims)
    return d.mean(dim=dims).pow(gamma)


def concept_collage(x0: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Multi-concept samples from a batch of single-concept ones: sample ``b`` becomes ``k``
    vertical strips of equal width (the last takes the remainder), strip ``j`` cut from sample
    ``(b + j) mod B`` at the same columns, with labels ``(B, k)`` listing the strips' classes
    from left to right. Deterministic (the batch is already shuffled); on latents, whose
    positions each summarise one image patch, a strip of latents is a strip of the image."""
    b, width = x0.shape[0], x0.shape[-1]
    if not 2 <= k <= min(b, width):
        raise ValueError(
            f"method.objective.concepts_per_caption={k} needs a batch and a latent width of at "
            f"least {k} (got batch {b}, width {width}): lower it, or raise data.batch_size"
        )
    edges = [j * (width // k) for j in range(k)] + [width]
    order = torch.stack([torch.arange(b, device=y.device).roll(-j) for j in range(k)], dim=1)
    strips = [x0[order[:, j].to(x0.device), ..., edges[j] : edges[j + 1]] for j in range(k)]
    return torch.cat(strips, dim=-1), y[order]


class IMBAObjective(Objective):
    """IMBA loss: IMBA-distance-weighted conditional loss plus an unconditional loss.

    Args:
        gamma: exponent of the IMBA distance (paper: 0.8).
        lam: weight ``lambda`` of the conditional term (paper: 0.9).
        granularity: ``"token"`` (paper) or ``"sample"`` (the granularity ablation).
        power: ``"elementwise"`` (default) or ``"after_mean"``, see :func:`imba_distance`.
        normalize: ``"none"`` (default; the paper states no normalisation, and ``gamma -> 0``
            must give the standard loss) or ``"batch_mean"`` (``D / mean(D)`` over the batch's
            tokens, so the conditional term keeps the scale of the plain MSE).
        fused_forward: run the conditional and unconditional predictions as one forward over
            the concatenated batch (speed only; GroupNorm is per sample).
        concepts_per_caption: 1 (the class-label form) or ``K > 1``: train on multi-concept
            captions of ``K`` classes each (:func:`concept_collage`; text-to-image backbones).
        cond_drop_prob, cond_drop_mode: must be 0 / ``"none"``: the unconditional term
            replaces label dropout.
    """

    name = "imba"
    trains_null_label = True  # its unconditional term trains the null label on every sample
    drops_labels = False

    def __init__(
        self,
        gamma: float = 0.8,
        lam: float = 0.9,
        granularity: str = "token",
        power: str = "elementwise",
        normalize: str = "none",
        fused_forward: bool = True,
        concepts_per_caption: int = 1,
        cond_drop_prob: float = 0.0,
        cond_drop_mode: str = "none",
    ) -> None:
        if cond_drop_prob != 0.0:
            raise ValueError(
                "IMBA trains the unconditional model through its (1 - lam) L_u term, which "
                f"replaces random label dropout: set method.objective.cond_drop_prob=0 (got "
                f"{cond_drop_prob})"
            )
        super().__init__(cond_drop_prob=0.0, cond_drop_mode=cond_drop_mode)
        if granularity not in IMBA_GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {IMBA_GRANULARITIES}, got {granularity!r}"
            )
        if power not in IMBA_POWERS:
            raise ValueError(f"power must be one of {IMBA_POWERS}, got {power!r}")
        if normalize not in IMBA_NORMALIZE:
            raise ValueError(
                f"normalize must be one of {IMBA_NORMALIZE}, got {normalize!r}: set "
                "method.objective.normalize"
            )
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if int(concepts_per_caption) < 1:
            raise ValueError(
                f"method.objective.concepts_per_caption must be >= 1 (1: class labels), got "
                f"{concepts_per_caption}"
            )
        self.gamma = float(gamma)
        self.lam = float(lam)
        self.granularity = granularity
        self.power = power
        self.normalize = normalize
        self.fused_forward = bool(fused_forward)
        self.concepts_per_caption = int(concepts_per_caption)

    def compute(
        self, model: Any, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Any = None
    ) -> Result:
        """The class-label form, or (``concepts_per_caption > 1``) the same loss on the batch
        recomposed into multi-concept captioned samples."""
        if self.concepts_per_caption > 1:
            if not hasattr(model, "caption"):
                raise ValueError(
                    f"method.objective.concepts_per_caption={self.concepts_per_caption} needs a "
                    f"text-to-image backbone that takes captions (model=sd_lora), not "
                    f"{type(model).__name__}: set it to 1"
                )
            x0, y = concept_collage(x0, y, self.concepts_per_caption)
        return super().compute(model, x0, y, schedule, aug_labels)

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        eps_c, eps_u = s.predict_pair(y, torch.full_like(y, s.model.null_label), self.fused_forward)

        dist = imba_distance(
            s.noise, eps_u.detach(), self.gamma, self.granularity, self.power
        ).detach()
        if self.normalize == "batch_mean":
            dist = dist / dist.mean().clamp_min(torch.finfo(dist.dtype).tiny)
        dtype = dist.dtype
        sq = (eps_c.to(dtype) - s.noise.to(dtype)).pow(2)
        err = sq.mean(dim=1) if self.granularity == "token" else sq.flatten(1).mean(1)
        cond = (dist * err).mean()
        uncond = mse(eps_u, s.noise).to(dtype)
        loss = self.lam * cond + (1.0 - self.lam) * uncond
        terms = {
            "imba_cond": cond.detach(),
            "imba_uncond": uncond.detach(),
            "imba_dist": dist.mean().detach(),
        }
        return ObjectiveOutput(loss, terms), s.context(eps_c)
