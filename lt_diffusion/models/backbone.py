"""The contract every backbone meets (DESIGN.md, step 2), written down: what the objectives,
samplers, generation, the training module and the evaluator may rely on. The pixel U-Net, the
latent U-Net and Stable Diffusion + LoRA meet it (tests/test_backbone.py checks each).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Backbone(Protocol):
    """A class-conditional noise predictor ``(x_t, t, y) -> eps``.

    * ``num_classes``: real classes ``0 .. C-1``; ``null_label`` (= C): the unconditional
      model that classifier-free guidance and label dropout use (``y=None`` means all null).
    * ``in_channels`` / ``image_size``: the images it generates (decoded ones for a latent
      backbone), ``(in_channels, image_size, image_size)``.
    * ``augment_dim``: width of ADA's augmentation labels it accepts (0: none).
    * ``forward(x, t, y=None, aug_labels=None, return_bottleneck=False)``: ``eps`` with
      ``x``'s shape; with ``return_bottleneck`` also the bottleneck feature map (CORAL).
    """

    num_classes: int
    null_label: int
    in_channels: int
    image_size: int
    augment_dim: int

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        aug_labels: Tensor | None = None,
        return_bottleneck: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]: ...


@runtime_checkable
class LatentSpace(Protocol):
    """What a backbone that denoises autoencoder latents adds: generation draws noise of
    ``latent_shape`` and decodes it; training diffuses a draw of the encoded images."""

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode_latents(self, latents: Tensor) -> Tensor: ...

    def latents_from_moments(self, moments: Tensor) -> Tensor: ...
