"""ADA: non-leaking augmentation with augmentation labels, as EDM trains (Karras et al. 2022,
after Karras et al. 2020; NVlabs/edm training/augment.py; CBDM's k-diffusion port, p = 0.12).

Every training image goes through a pipeline of random transformations, each applied
independently with probability ``p`` (times a per-operation multiplier); the network is told
what was done through a 9-dimensional *augmentation label* added to its conditioning, and at
sampling time it gets none (zeros), i.e. it generates un-augmented images. Because the model is
conditioned on the transformation, the augmentations do not leak into the generated
distribution.

Our pipeline and label layout (EDM's blitting and geometric groups, with EDM's fractional
translation replaced by its integer translation, exact and invertible)::

    0  x-flip                    1 if mirrored left-right
    1  y-flip                    1 if mirrored top-bottom
    2  integer translation x     tx / (W * translate_max), tx in pixels (reflect padding)
    3  integer translation y     ty / (H * translate_max)
    4  isotropic scale           z ~ N(0, 1), scale = 2^(scale_std * z)
    5  rotation                  cos(theta) - 1, theta ~ U(-pi, pi) * rotate_max
    6  rotation                  sin(theta)
    7  anisotropic scale         z cos(phi), z ~ N(0, 1) (scale 2^(aniso_std z) along phi,
    8  anisotropic scale         z sin(phi)                its inverse across), phi ~ U(-pi, pi)

A label is all zeros exactly when nothing was applied. Geometric operations are executed in one
bicubic resampling with reflection padding (EDM supersamples with a wavelet filter; at p = 0.12
the difference is immaterial and this keeps the step cheap); images no geometric operation
touched are passed through untouched, so ``p = 0`` is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Aug, Model, Objective, Result
from lt_diffusion.methods.common import WrappingObjective

AUG_DIM = 9


@dataclass
class AugmentParams:
    """Per-image parameters of one pipeline draw; all (N,), zero meaning "not applied"."""

    xflip: Tensor  # 0 / 1
    yflip: Tensor  # 0 / 1
    tx: Tensor  # int64 pixels, content moves right
    ty: Tensor  # int64 pixels, content moves down
    scale: Tensor  # z: isotropic scale 2^(scale_std z)
    rotate: Tensor  # theta in radians
    aniso: Tensor  # z: anisotropic scale 2^(aniso_std z)
    aniso_angle: Tensor  # phi in radians

    @classmethod
    def identity(cls, n: int, device: torch.device | str | None = None) -> AugmentParams:
        z = torch.zeros(n, device=device)
        zi = torch.zeros(n, dtype=torch.long, device=device)
        return cls(z, z, zi, zi, z, z, z, z)


def _reflect(idx: Tensor, size: int) -> Tensor:
    """Fold indices into ``[0, size)`` by mirror reflection about the edge pixels."""
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    return (size - 1) - ((size - 1) - idx.remainder(period)).abs()


def _rot(angle: Tensor) -> Tensor:
    """2x2 rotation matrices (N, 2, 2) for x right, y down."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _diag(sx: Tensor, sy: Tensor) -> Tensor:
    z = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, z], -1), torch.stack([z, sy], -1)], -2)


class AugmentPipeline:
    """EDM-style augmentation with 9-dimensional labels (see the module docstring).

    Args:
        p: probability of applying each operation (EDM / CBDM: 0.12).
        xflip, yflip, translate, scale, rotate, aniso: per-operation probability multipliers
            (0 disables an operation; its label entries then stay 0).
        translate_max: largest integer translation, as a fraction of the image size (EDM 0.125).
        scale_std: log2 standard deviation of the isotropic scale (EDM 0.2).
        rotate_max: rotation range as a fraction of a half turn (1: any angle, EDM).
        aniso_std: log2 standard deviation of the anisotropic scale (EDM 0.2).
    """

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = 1.0,
        yflip: float = 1.0,
        translate: float = 1.0,
        scale: float = 1.0,
        rotate: float = 1.0,
        aniso: float = 1.0,
        translate_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_max: float = 1.0,
        aniso_std: float = 0.2,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        mults = dict(xflip=xflip, yflip=yflip, translate=translate, scale=scale, rotate=rotate)
        mults["aniso"] = aniso
        if any(m < 0 for m in mults.values()):
            raise ValueError(f"augmentation multipliers must be >= 0, got {mults}")
        self.p = float(p)
        self.mults = {k: float(v) for k, v in mults.items()}
        self.translate_max = float(translate_max)
        self.scale_std = float(scale_std)
        self.rotate_max = float(rotate_max)
        self.aniso_std = float(aniso_std)

    def _fires(self, op: str, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, device=device) < self.p * self.mults[op]

    def sample(self, n: int, height: int, width: int, device: torch.device) -> AugmentParams:
        """Draw the parameters of ``n`` images (on ``device``; no host synchronisation)."""
        zero = torch.zeros(n, device=device)
        xflip = self._fires("xflip", n, device).float()
        yflip = self._fires("yflip", n, device).float()
        on = self._fires("translate", n, device)
        u = torch.rand(2, n, device=device) * 2 - 1
        tx = torch.where(on, (u[0] * width * self.translate_max).round(), zero).long()
        ty = torch.where(on, (u[1] * height * self.translate_max).round(), zero).long()
        scale = torch.where(self._fires("scale", n, device), torch.randn(n, device=device), zero)
        theta = (torch.rand(n, device=device) * 2 - 1) * (math.pi * self.rotate_max)
        rotate = torch.where(self._fires("rotate", n, device), theta, zero)
        on = self._fires("aniso", n, device)
        aniso = torch.where(on, torch.randn(n, device=device), zero)
        phi = torch.where(on, (torch.rand(n, device=device) * 2 - 1) * math.pi, zero)
        return AugmentParams(xflip, yflip, tx, ty, scale, rotate, aniso, phi)

    def labels(self, params: AugmentParams, height: int, width: int) -> Tensor:
        """The (N, 9) float32 augmentation labels of ``params`` (zeros: not augmented)."""
        tmax_x = max(width * self.translate_max, 1e-8)
        tmax_y = max(height * self.translate_max, 1e-8)
        cols = [
            params.xflip.float(),
            params.yflip.float(),
            params.tx.float() / tmax_x,
            params.ty.float() / tmax_y,
            params.scale.float(),
            params.rotate.cos() - 1,
            params.rotate.sin(),
            params.aniso * params.aniso_angle.cos(),
            params.aniso * params.aniso_angle.sin(),
        ]
        return torch.stack(cols, dim=1).float()

    def inverse_matrix(self, params: AugmentParams) -> Tensor:
        """(N, 2, 2): output pixel offset from the centre -> input offset (x right, y down).

        The forward map is ``S_iso(s) R(theta) A`` with ``A = R(phi) diag(a, 1/a) R(-phi)``.
        """
        s = torch.exp2(-self.scale_std * params.scale.float())
        a = torch.exp2(self.aniso_std * params.aniso.float())
        phi = params.aniso_angle.float()
        a_inv = _rot(phi) @ _diag(1 / a, a) @ _rot(-phi)
        return a_inv @ _rot(-params.rotate.float()) @ _diag(s, s)

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Apply ``params`` to ``images`` (N, C, H, W): flips, integer translation, geometry."""
        n, c, h, w = images.shape
        dtype = images.dtype
        x = images.float()
        x = torch.where(params.xflip.view(n, 1, 1, 1) > 0, x.flip(3), x)
        x = torch.where(params.yflip.view(n, 1, 1, 1) > 0, x.flip(2), x)

        # Integer translation: out[y, x] = in[y - ty, x - tx], reflected at the borders.
        rows = _reflect(torch.arange(h, device=x.device)[None] - params.ty[:, None], h)
        cols = _reflect(torch.arange(w, device=x.device)[None] - params.tx[:, None], w)
        x = torch.gather(x, 2, rows[:, None, :, None].expand(n, c, h, w))
        x = torch.gather(x, 3, cols[:, None, None, :].expand(n, c, h, w))

        # Geometry in normalised coordinates (align_corners=False: u = 2 * offset / size).
        m = self.inverse_matrix(params)
        to_norm = torch.tensor([2.0 / w, 2.0 / h], device=x.device)
        theta = m * to_norm[:, None] / to_norm[None, :]
        theta = torch.cat([theta, theta.new_zeros(n, 2, 1)], dim=2)
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        warped = F.grid_sample(
            x, grid, mode="bicubic", padding_mode="reflection", align_corners=False
        )
        touched = (params.scale != 0) | (params.rotate != 0) | (params.aniso != 0)
        x = torch.where(touched.view(n, 1, 1, 1), warped, x)
        return x.to(dtype)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Augment a batch: returns the images and their (N, 9) labels."""
        n, _, h, w = images.shape
        if self.p == 0.0:  # a setting, not a tensor value: skip the work entirely
            return images, torch.zeros(n, AUG_DIM, device=images.device)
        params = self.sample(n, h, w, images.device)
        return self.apply(images, params), self.labels(params, h, w)


def enable_augment_labels(model: nn.Module, augment_dim: int = AUG_DIM) -> nn.Module:
    """Model transform of ``method=ada``: give the backbone its augmentation-label input.

    A backbone built with ``augment_dim == augment_dim`` is returned as is; one built with
    ``augment_dim == 0`` gets the projection a U-Net built with ``augment_dim`` has (a
    bias-free ``Linear(augment_dim, width of the conditioning vector)``). Zero labels add
    nothing, so sampling, which passes none, is unchanged.
    """
    if getattr(model, "vector_dim", None) is not None:
        raise ValueError(
            "method=ada augments images (flips, translations, rotations, scaling) and feeds the "
            f"augmentation to the network, but {type(model).__name__} denoises points "
            "(dataset=toy2d / toy16d): ADA does not apply to them; pick another method"
        )
    current = getattr(model, "augment_dim", None)
    if current is None or not hasattr(model, "label_emb"):
        raise TypeError(
            f"{type(model).__name__} has no augmentation-label hook (augment_dim / label_emb); "
            "method=ada needs a backbone built for it, e.g. the pixel U-Net"
        )
    if current == augment_dim:
        return model
    if current != 0:
        raise ValueError(
            f"model.augment_dim is {current} but method=ada feeds {augment_dim} labels: set "
            f"model.augment_dim={augment_dim} or 0"
        )
    ref = model.label_emb.weight
    model.aug_emb = nn.Linear(
        augment_dim, ref.shape[1], bias=False, device=ref.device, dtype=ref.dtype
    )
    model.augment_dim = augment_dim
    return model


class ADAObjective(WrappingObjective):
    """Wraps a base objective: augments the clean batch and feeds the labels to the model.

    Args:
        base: the objective trained on the augmented batch (DDPM in the CM tables; CBDM in
            CBDM's "+ADA" row). It must be a :class:`Objective`.
        augment: the settings of :class:`AugmentPipeline` (``p``, ``xflip``, ...).
    """

    name = "ada"
    passes = 0  # trains its base on the augmented batch

    def __init__(self, base: Objective, **augment: float) -> None:
        super().__init__(base)  # CFG dropout is the base objective's business
        self.augment = AugmentPipeline(**augment)

    def compute(
        self, model: Model, x0: Tensor, y: Tensor, schedule: NoiseSchedule, aug_labels: Aug = None
    ) -> Result:
        """The base objective's step on the augmented batch (the context holds the labels)."""
        if aug_labels is not None:
            raise ValueError("ADA makes its own augmentation labels; do not nest augmentations")
        dim = getattr(model, "augment_dim", AUG_DIM)
        if dim != AUG_DIM:
            raise ValueError(
                f"method=ada feeds {AUG_DIM} augmentation labels but the model has "
                f"augment_dim={dim}: keep the method's model_transform "
                "(lt_diffusion.methods.ada.enable_augment_labels) or set "
                f"model.augment_dim={AUG_DIM}"
            )
        x_aug, labels = self.augment(x0)
        out, ctx = self.base.compute(model, x_aug, y, schedule, aug_labels=labels.to(x0.dtype))
        out.terms["augmented"] = (labels != 0).any(dim=1).float().mean()
        return out, ctx
