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

import math
from typing import Any

import torch
from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, check_choice, mse

IMBA_GRANULARITIES = ("token", "sample")
IMBA_POWERS = ("elementwise", "after_mean")
IMBA_NORMALIZE = ("none", "batch_mean")


def token_view(x: Tensor, tokens: int = 1) -> Tensor:
    """``x`` with its channels on dim 1 and its tokens after them: images ``(B, C, H, W)`` as
    they are (a token is a pixel or latent position); points ``(B, D)`` of a model of
    ``tokens`` = T > 1 tokens (the concept-pair model) as ``(B, D / T, T)``, token ``j`` being
    coordinates ``j D / T .. (j + 1) D / T - 1``; points of a one-token model as they are."""
    if x.ndim != 2 or int(tokens) <= 1:
        return x
    b, d = x.shape
    if d % int(tokens):
        raise ValueError(f"{d} coordinates do not split into {tokens} tokens")
    return x.reshape(b, int(tokens), d // int(tokens)).transpose(1, 2)


def imba_distance(
    noise: Tensor,
    eps_uncond: Tensor,
    gamma: float = 0.8,
    granularity: str = "token",
    power: str = "elementwise",
    tokens: int = 1,
) -> Tensor:
    """The IMBA distance (IMBA paper, ``D = ||eps - eps_theta(x_t, null, t)||^gamma``).

    A point ``(B, D)`` of the synthetic benchmark is one token with ``D`` channels, so both
    granularities give one weight per sample there; a point of a ``tokens``-token model (the
    concept-pair model) has one weight per token, ``(B, tokens)`` (:func:`token_view`).

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
    check_choice("granularity", granularity, IMBA_GRANULARITIES)
    check_choice("power", power, IMBA_POWERS)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if noise.shape != eps_uncond.shape or noise.ndim < 2:
        raise ValueError(
            f"noise and eps_uncond must both be (B, C, H, W) (or (B, D) points), got "
            f"{tuple(noise.shape)} and {tuple(eps_uncond.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(noise.dtype, eps_uncond.dtype), torch.float32)
    d = token_view((noise.to(dtype) - eps_uncond.to(dtype)).abs(), tokens)
    dims = (1,) if granularity == "token" else tuple(range(1, d.ndim))
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
    passes = 2  # conditional and unconditional predictions
    weight_term = "imba_dist"  # the logged name of the mean loss weight
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
        check_choice("granularity", granularity, IMBA_GRANULARITIES)
        check_choice("power", power, IMBA_POWERS)
        check_choice("normalize", normalize, IMBA_NORMALIZE)
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

    def weights(self, s: Step, y: Tensor, eps_u: Tensor) -> Tensor:
        """The conditional loss's weights, detached: one per token (``(B, H, W)``; ``(B, T)``
        for a T-token model of points) or per sample (``(B,)``). Here the IMBA distance."""
        tokens = model_tokens(s.model)
        return imba_distance(
            s.noise, eps_u.detach(), self.gamma, self.granularity, self.power, tokens
        ).detach()

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        null = torch.full_like(y, s.model.null_label)
        eps_c, eps_u = s.predict_labels([y, null], self.fused_forward)

        dist = self.weights(s, y, eps_u)
        if self.normalize == "batch_mean":
            dist = dist / dist.mean().clamp_min(torch.finfo(dist.dtype).tiny)
        dtype = dist.dtype
        sq = token_view((eps_c.to(dtype) - s.noise.to(dtype)).pow(2), model_tokens(s.model))
        err = sq.mean(dim=1) if self.granularity == "token" else sq.flatten(1).mean(1)
        cond = (dist * err).mean()
        uncond = mse(eps_u, s.noise).to(dtype)
        loss = self.lam * cond + (1.0 - self.lam) * uncond
        prefix = self.name
        terms = {
            f"{prefix}_cond": cond.detach(),
            f"{prefix}_uncond": uncond.detach(),
            self.weight_term: dist.mean().detach(),
        }
        return ObjectiveOutput(loss, terms), s.context(eps_c)


def model_tokens(model: Any) -> int:
    """Tokens per sample of a model of points (``model.tokens``, the concept-pair model: 2); 1
    for every other backbone (images: every position is a token anyway)."""
    return int(getattr(model, "tokens", 1) or 1)


def inverse_frequency(counts: Tensor, groups: list[int], alpha: float = 1.0) -> Tensor:
    """Inverse-frequency weights of concepts from their counted training frequencies: within
    each group of consecutive concepts (a vocabulary), ``w_c = phi_c^-alpha / sum_k
    phi_k^(1 - alpha)``, ``phi`` the concept's share of the group's samples, so that the mean
    weight of the group's training samples is 1 (``alpha = 1``: ``w_c = 1 / (K phi_c)``, every
    concept weighs as much in total). A concept without samples gets 0. Float64, ``(sum
    groups,)``."""
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    if sum(groups) != counts.numel() or bool((counts < 0).any()):
        raise ValueError(f"counts {counts.tolist()} do not fit the concept groups {groups}")
    out = torch.zeros_like(counts)
    start = 0
    for size in groups:
        n = counts[start : start + size]
        seen = n > 0
        if not bool(seen.any()):
            raise ValueError("frequency-based weights need concepts with training samples")
        phi = n[seen] / n.sum()
        out[start : start + size][seen] = phi.pow(-alpha) / phi.pow(1.0 - alpha).sum()
        start += size
    return out


def token_weights(per_label: Tensor, y: Tensor, like: Tensor) -> Tensor:
    """Per-token weights ``(B, *tokens)`` of the tokens of ``like`` (``token_view`` shape
    ``(B, C, *tokens)``) when every token of sample ``b`` shows the concept ``y[b]`` (``y``
    (B,)), or, for concept rows ``y`` (B, K) (a multi-concept caption,
    :func:`concept_collage`), when the tokens of strip ``j`` (columns of equal width, the last
    taking the remainder) show ``y[b, j]``."""
    shape = (like.shape[0], *like.shape[2:])
    w = per_label[y]
    if y.ndim == 1:
        return w.view(-1, *[1] * (len(shape) - 1)).expand(shape)
    width, k = shape[-1], y.shape[1]
    strip = (torch.arange(width, device=y.device) // (width // k)).clamp_max(k - 1)
    return w[:, strip].view(shape[0], *[1] * (len(shape) - 2), width).expand(shape)


class FrequencyBalancedObjective(IMBAObjective):
    """Frequency-based balancing (the IMBA paper's comparison of balancing methods): the IMBA
    loss with the IMBA distance replaced by weights from *counted* concept frequencies,
    :func:`inverse_frequency` of the training counts (offline statistics, fixed for the run).

    The concept of a token: the class of its sample (or of its strip, for multi-concept
    captions), or, for the concept-pair model, the concept that token shows (token 0 its
    vocabulary-A concept, token 1 its vocabulary-B one), each vocabulary normalised on its own.
    ``granularity: sample`` averages a sample's token weights. Everything else (``lam``, the
    unconditional term, ``concepts_per_caption``) is :class:`IMBAObjective`'s, so the two
    methods differ only in where the weights come from.

    Args:
        alpha: the power of the inverse frequency (1: full inverse-frequency weighting).
    """

    name = "freq_balanced"
    weight_term = "freq_weight"

    def __init__(
        self,
        alpha: float = 1.0,
        lam: float = 0.9,
        granularity: str = "token",
        fused_forward: bool = True,
        concepts_per_caption: int = 1,
        cond_drop_prob: float = 0.0,
        cond_drop_mode: str = "none",
    ) -> None:
        super().__init__(
            gamma=0.0, lam=lam, granularity=granularity, fused_forward=fused_forward,
            concepts_per_caption=concepts_per_caption, cond_drop_prob=cond_drop_prob,
            cond_drop_mode=cond_drop_mode,
        )  # fmt: skip
        if not (float(alpha) >= 0.0 and math.isfinite(float(alpha))):
            raise ValueError(f"method.objective.alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def weights(self, s: Step, y: Tensor, eps_u: Tensor) -> Tensor:
        if self.class_counts.numel() == 0:
            raise RuntimeError("objective.setup(class_counts) must be called before training")
        model = s.model
        like = token_view(s.noise, model_tokens(model))
        if hasattr(model, "token_concepts"):  # one concept per token (the concept-pair model)
            w = inverse_frequency(model.concept_counts(self.class_counts), model.vocab_sizes,
                                  self.alpha).to(like.device, torch.float32)  # fmt: skip
            per_token = w[model.token_concepts(y)]
        else:
            groups = [self.class_counts.numel()]
            w = inverse_frequency(self.class_counts, groups, self.alpha)
            per_token = token_weights(w.to(like.device, torch.float32), y, like)
        if self.granularity == "sample":
            return per_token.flatten(1).mean(1)
        return per_token
