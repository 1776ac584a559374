"""The contract every backbone meets (DESIGN.md, step 2), written down: what the objectives,
samplers, generation, the training module and the evaluator may rely on. The pixel U-Net, the
MLP, the latent U-Net, the text-conditioned latent U-Net and Stable Diffusion + LoRA subclass
:class:`Backbone` (tests/test_backbone.py checks each).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class LatentSpace(Protocol):
    """What a backbone that denoises autoencoder latents adds: generation draws noise of
    ``latent_shape`` and decodes it; training diffuses a draw of the encoded images."""

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode_latents(self, latents: Tensor) -> Tensor: ...

    def latents_from_moments(self, moments: Tensor) -> Tensor: ...


class Backbone(nn.Module):
    """A class-conditional noise predictor ``(x_t, t, y) -> eps``; every backbone subclasses
    it.

    * ``num_classes``: real classes ``0 .. C-1``; ``null_label`` (= C): the unconditional
      model that classifier-free guidance and label dropout use (``y=None`` means all null).
    * ``in_channels`` / ``image_size``: the images it generates (decoded ones for a latent
      backbone), ``(in_channels, image_size, image_size)``.
    * ``augment_dim``: width of ADA's augmentation labels it accepts (0: none).
    * ``concept_rows``: it accepts ``(B, K)`` multi-concept label rows (Stable Diffusion's
      captions).
    * :meth:`forward` checks the conditioning every backbone shares (one timestep and one
      label per sample, augmentation labels only where the model was built for them; shapes
      only, so no host sync), then runs the subclass's :meth:`denoise`.
    """

    num_classes: int
    null_label: int
    in_channels: int
    image_size: int
    augment_dim: int = 0
    concept_rows: bool = False

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        aug_labels: Tensor | None = None,
        return_bottleneck: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``eps`` for ``x`` at timesteps ``t`` (B,) or one shared scalar, labels ``y`` (None:
        the null label); with ``return_bottleneck`` also the bottleneck feature map (CORAL)."""
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(
                f"t must have shape ({b},) (one timestep per sample), got {tuple(t.shape)}"
            )
        if y is not None and (y.shape[:1] != (b,) or y.ndim > 1 + self.concept_rows):
            rows = f" or ({b}, K) concept rows" if self.concept_rows else ""
            raise ValueError(
                f"y must have shape ({b},) (one label per sample){rows}, got {tuple(y.shape)}"
            )
        if aug_labels is not None and self.augment_dim == 0:
            raise ValueError(
                f"aug_labels were passed but {type(self).__name__} was built with "
                "augment_dim=0: set model.augment_dim (9 for EDM-style ADA; pixel U-Net and "
                "MLP only) or use a method without augmentation labels"
            )
        if aug_labels is not None and aug_labels.shape != (b, self.augment_dim):
            raise ValueError(
                f"aug_labels must have shape ({b}, {self.augment_dim}), got "
                f"{tuple(aug_labels.shape)}"
            )
        return self.denoise(x, t, y, aug_labels, return_bottleneck)

    def add_labels(self, temb: Tensor, y: Tensor | None, aug: Tensor | None) -> Tensor:
        """``temb + E[y] (+ A aug)`` for the backbones that add their class embedding
        ``label_emb`` (null row for ``y=None``) and ADA's ``aug_emb`` to the time embedding
        (the pixel U-Net, the MLP)."""
        if y is None:
            y = torch.full(temb.shape[:1], self.null_label, dtype=torch.long, device=temb.device)
        temb = temb + self.label_emb(y)
        return temb if aug is None else temb + self.aug_emb(aug.to(temb.dtype))

    def skip_pass(self, h: Tensor, temb: Tensor, skips: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(output, bottleneck)`` of the encoder-decoder with skip connections that the pixel
        U-Net and the MLP share: the ``down`` blocks (each output pushed onto ``skips``), the
        ``mid`` blocks, then the ``up`` blocks, each joining the last skip to its input
        (concatenated channels) unless it says ``joins_skip = False`` (an upsampling)."""
        for block in self.down:
            h = block(h, temb)
            skips.append(h)
        for block in self.mid:
            h = block(h, temb)
        h_mid = h
        for block in self.up:
            if getattr(block, "joins_skip", True):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, temb)
        return h, h_mid

    def denoise(
        self, x: Tensor, t: Tensor, y: Tensor | None, aug: Tensor | None, bottleneck: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The backbone's network on checked inputs (``t`` of shape (B,))."""
        raise NotImplementedError
