"""A small conditional denoiser for vector data (the synthetic benchmark, ``model=mlp``).

The U-Net of :mod:`lt_diffusion.models.unet` with its convolutions replaced by linear layers and
without resolutions: residual MLP blocks on the way down, two in the middle, and blocks on skip-
concatenated features on the way up. The conditioning is the U-Net's: a sinusoidal timestep
embedding through a two-layer MLP, plus a class embedding with one null row (classifier-free
guidance) and the optional augmentation-label projection, added together and fed to every block
as a per-feature shift.

It keeps the U-Net's call and hooks, so every objective, sampler and guidance runs on it:

* ``forward(x, t, y=None, aug_labels=None, return_bottleneck=False)`` with ``x`` (B, D);
* ``null_label = num_classes``; ``augment_dim``;
* ``return_bottleneck=True`` also returns the features after the middle blocks, (B, C_mid) with
  ``C_mid = ch * ch_mult[-1]``, the U-Net's formula (CORAL's projection head);
* ``model.up``: the up half as one ``ModuleList`` of ``Linear`` layers, where CM's capacity
  reservation (``reserve_capacity(layers="up")``) and Group-Expert LoRA put their low-rank parts.

``vector_dim`` (= ``in_channels`` = D) marks it as a model of vectors; ``image_size`` is None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_diffusion.models.backbone import Backbone
from lt_diffusion.models.unet import SMALL_GAIN, _as_int_tuple, _xavier, timestep_embedding


class ResidualMLPBlock(nn.Module):
    """``LN -> SiLU -> Linear``, plus ``Linear(SiLU(temb))``, then ``LN -> SiLU -> Dropout ->
    Linear`` (small-gain init, so the block starts near identity) and a linear shortcut when
    the width changes: Ho et al.'s residual block with the convolutions made linear. It is
    given ``SiLU(temb)`` (the MLP applies the SiLU once for all its blocks)."""

    def __init__(self, in_dim: int, out_dim: int, temb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.temb_proj = nn.Linear(temb_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.shortcut = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()
        for layer in (self.fc1, self.temb_proj, self.shortcut):
            if isinstance(layer, nn.Linear):
                _xavier(layer)
        _xavier(self.fc2, gain=SMALL_GAIN)

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        h = self.fc1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)
        h = self.fc2(self.dropout(F.silu(self.norm2(h))))
        return h + self.shortcut(x)


class MLPDenoiser(Backbone):
    """Class-conditional epsilon-prediction MLP for points in R^D.

    Args:
        dim: coordinates per point D (``dataset.channels``); the output has D too.
        num_classes: real classes; embedding row ``num_classes`` is the null label.
        ch: base width; even (the sinusoidal time embedding has ``ch`` features).
        ch_mult: width multiplier per level (level ``i`` runs at ``ch * ch_mult[i]``).
        num_res_blocks: residual blocks per level, on the way down and on the way up.
        dropout: dropout probability inside the blocks.
        augment_dim: width of ADA's augmentation labels; 0 disables (ADA refuses vectors).
        emb_mult: the conditioning vector has ``emb_mult * ch`` features (the U-Net: 4).
        image_size: must be None: this backbone takes vectors, not images (a guard against
            ``model=mlp`` on an image dataset).

    Module layout: ``head`` (Linear D -> ch), ``down``, ``mid`` (two blocks), ``up`` (blocks on
    ``[h, skip]``), ``tail`` (LayerNorm, SiLU, Linear -> D).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1),
        num_res_blocks: int = 1,
        dropout: float = 0.0,
        augment_dim: int = 0,
        emb_mult: int = 4,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        ch_mult = _as_int_tuple(ch_mult, "model.ch_mult")
        if image_size is not None:
            raise ValueError(
                f"model=mlp denoises vectors (dataset=toy2d, toy16d) but the dataset has "
                f"{image_size}px images: use a U-Net (model=unet_small, ...) for images"
            )
        if int(dim) < 1 or int(num_classes) < 1:
            raise ValueError(
                f"model.dim and model.num_classes must be >= 1, got {dim}, {num_classes}"
            )
        if ch < 2 or ch % 2 != 0:
            raise ValueError(f"model.ch must be a positive even number, got {ch}")
        if not ch_mult or any(m < 1 for m in ch_mult):
            raise ValueError(f"model.ch_mult must list positive integers, got {list(ch_mult)}")
        if num_res_blocks < 1 or not 0.0 <= dropout < 1.0 or augment_dim < 0 or emb_mult < 1:
            raise ValueError(
                "model.num_res_blocks and model.emb_mult must be >= 1, model.dropout in [0, 1) "
                f"and model.augment_dim >= 0; got {num_res_blocks}, {emb_mult}, {dropout}, "
                f"{augment_dim}"
            )
        self.vector_dim = self.in_channels = int(dim)
        self.image_size = None
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        self.augment_dim = int(augment_dim)
        self.ch = int(ch)
        temb_dim = int(emb_mult) * self.ch

        self.time_mlp = nn.Sequential(
            nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            _xavier(layer)
        self.label_emb = nn.Embedding(self.num_classes + 1, temb_dim)  # N(0, 1), as the U-Net
        self.aug_emb = nn.Linear(augment_dim, temb_dim, bias=False) if augment_dim > 0 else None

        self.head = nn.Linear(self.vector_dim, ch)
        _xavier(self.head)
        self.down = nn.ModuleList()
        skips, now = [], ch
        for mult in ch_mult:
            for _ in range(num_res_blocks):
                self.down.append(ResidualMLPBlock(now, ch * mult, temb_dim, dropout))
                now = ch * mult
                skips.append(now)
        self.mid = nn.ModuleList([ResidualMLPBlock(now, now, temb_dim, dropout) for _ in range(2)])
        self.bottleneck_channels = now
        self.up = nn.ModuleList()
        for mult in reversed(ch_mult):
            for _ in range(num_res_blocks):
                self.up.append(ResidualMLPBlock(now + skips.pop(), ch * mult, temb_dim, dropout))
                now = ch * mult
        self.tail = nn.Sequential(nn.LayerNorm(now), nn.SiLU(), nn.Linear(now, self.vector_dim))
        _xavier(self.tail[2], gain=SMALL_GAIN)

    def embed(self, t: Tensor, y: Tensor | None, aug_labels: Tensor | None) -> Tensor:
        """The conditioning vector ``MLP(sin(t)) + E[y] (+ A aug_labels)``, (B, emb_mult ch)."""
        dtype = self.time_mlp[0].weight.dtype
        if self.training:  # a training batch rarely repeats a timestep (and vmap needs this)
            temb = self.time_mlp(timestep_embedding(t, self.ch).to(dtype))
        else:
            # Once per distinct timestep: a sampler's batch shares one, and at these widths
            # the time MLP costs as much as the rest of the network.
            steps, index = torch.unique(t, return_inverse=True)
            temb = self.time_mlp(timestep_embedding(steps, self.ch).to(dtype))[index]
        return self.add_labels(temb, y, aug_labels)

    def denoise(
        self, x: Tensor, t: Tensor, y: Tensor | None, aug: Tensor | None, bottleneck: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict the noise in ``x`` (B, D) (see :meth:`Backbone.forward`); the bottleneck is
        the middle blocks' output."""
        if x.ndim != 2 or x.shape[1] != self.vector_dim:
            raise ValueError(
                f"x must have shape (B, {self.vector_dim}) (points, not images), got "
                f"{tuple(x.shape)}"
            )
        # SiLU(temb) once: every block's time projection reads the same activation.
        h, h_mid = self.skip_pass(self.head(x), F.silu(self.embed(t, y, aug)), [])
        eps = self.tail(h)
        return (eps, h_mid) if bottleneck else eps
