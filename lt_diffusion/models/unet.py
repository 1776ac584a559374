"""The pixel-space U-Net of Ho et al. (DDPM), in the form CBDM, OC and CM train it.

Layout follows the PyTorch port of Ho et al.'s TF code that CBDM / OC build on: a sinusoidal
timestep embedding through a two-layer MLP, a class embedding (plus one null row for
classifier-free guidance) and an optional augmentation-label projection (ADA) *added* to it,
GroupNorm / SiLU residual blocks with a per-channel time projection, self-attention at chosen
resolutions (single-head as in Ho et al. by default), strided-conv downsampling and nearest +
conv upsampling.

Hooks the methods use:

* ``null_label``: the class index of the unconditional model (``y=None`` means all-null).
* ``aug_labels``: ADA's augmentation description, ``None`` at sampling time.
* ``return_bottleneck=True``: also return the feature map after the middle blocks (CORAL).
* ``attention``: the attention block class, picked by name from :data:`ATTENTION_BLOCKS`, so a
  timestep-dependent variant (PD-CBDM's TSA) is one registry entry; every block is built as
  ``cls(channels, temb_dim, num_heads=..., norm=...)`` and its forward takes ``(x, temb)``.
* ``model.up``: the up-sampling half as one ``ModuleList`` (CM decomposes only these weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_diffusion.models.backbone import Backbone

# GroupNorm: at most 32 groups (Ho et al.) and at least 4 channels in each. Ho et al. run at
# widths >= 128, where the two agree (32 groups of >= 4). At narrower widths 32 groups would
# be one channel each: the norm then removes any per-channel constant, so the time / class
# shift a residual block adds before its second norm would vanish (t and y ignored).
NORM_GROUPS = 32
NORM_GROUP_MIN_CHANNELS = 4
# Output layers of residual branches start near zero, so every block starts near identity.
SMALL_GAIN = 1e-5


def _xavier(module: nn.Conv2d | nn.Linear, gain: float = 1.0) -> None:
    """Ho et al.'s initialization: xavier-uniform weights, zero biases."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def norm_group_count(
    channels: int, max_groups: int = NORM_GROUPS, min_channels: int = NORM_GROUP_MIN_CHANNELS
) -> int:
    """GroupNorm's group count for a width: the most groups, at most ``max_groups``, that divide
    ``channels`` and leave at least ``min_channels`` channels in each (32 groups of 4 at
    Ho et al.'s 128 channels; 8 groups of 4 at 32 channels)."""
    for groups in range(min(max_groups, channels // min_channels), 0, -1):
        if channels % groups == 0:
            return groups
    raise ValueError(
        f"a GroupNorm over {channels} channels cannot keep {min_channels} channels per group: "
        f"lower model.norm_group_min_channels or widen the model (model.ch)"
    )


def group_norm(
    channels: int, max_groups: int = NORM_GROUPS, min_channels: int = NORM_GROUP_MIN_CHANNELS
) -> nn.GroupNorm:
    """``nn.GroupNorm`` with :func:`norm_group_count` groups."""
    return nn.GroupNorm(norm_group_count(channels, max_groups, min_channels), channels)


# Builds the GroupNorm for a width: what the blocks take as ``norm``.
NormFactory = Callable[[int], nn.GroupNorm]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` (shape ``(B,)``) into ``dim`` features.

    Frequencies ``10000^(-2i/dim)``; sin and cos interleaved per frequency, as in the PyTorch
    port CBDM / OC use (so the features line up with theirs). Computed in float32 on the fly,
    so no table bounds T and half-precision weights never round the phases.
    """
    if dim % 2 != 0:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = torch.arange(0, dim, 2, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * half / dim)
    phase = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.stack((torch.sin(phase), torch.cos(phase)), dim=-1).flatten(1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    ``x + W_o concat_n softmax(Q_n K_n^T / sqrt(d)) V_n`` (Vaswani et al. 2017, eq. 1 and
    Sec. 3.2.2) with ``Q, K, V`` 1x1 projections of ``GroupNorm(x)`` split along channels into
    ``num_heads`` heads of ``d = C / num_heads`` channels (head ``n`` takes channels
    ``n d .. (n+1) d - 1``). One head is Ho et al.'s attention (scale ``1 / sqrt(C)``).
    Subclasses change how Q, K, V are formed by overriding :meth:`project_qkv` (PD-CBDM's TSA
    adds a projection of ``temb`` to each).

    Args:
        channels: feature channels C (divisible by ``num_heads``).
        temb_dim: width of the time embedding; unused here, part of the block interface.
        num_heads: attention heads (1: Ho et al.).
        norm: builds the GroupNorm for ``channels`` (default: :func:`group_norm`).
    """

    def __init__(
        self, channels: int, temb_dim: int, num_heads: int = 1, norm: NormFactory = group_norm
    ) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(
                f"attention over {channels} channels cannot be split into {num_heads} heads: "
                "the head count (model.attn_heads / model.tsa_heads) must divide the width"
            )
        self.num_heads = int(num_heads)
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        for layer in (self.q, self.k, self.v):
            _xavier(layer)
        _xavier(self.out, gain=SMALL_GAIN)

    def project_qkv(self, h: Tensor, temb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``(B, C, H, W)`` from the normalised features ``h``."""
        return self.q(h), self.k(h), self.v(h)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        b, c, height, width = x.shape
        q, k, v = self.project_qkv(self.norm(x), temb)
        # (B, C, H, W) -> (B, heads, H*W, C / heads). permute+flatten instead of .view: free on
        # channels_last tensors, a copy only where needed on contiguous ones.
        q, k, v = (
            z.permute(0, 2, 3, 1).flatten(1, 2).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
            for z in (q, k, v)
        )
        a = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C / heads)
        a = a.transpose(1, 2).reshape(b, height, width, c).permute(0, 3, 1, 2)
        return x + self.out(a)


class TimestepSelfAttention(SelfAttention):
    """PD-CBDM's timestep-dependent self-attention (TSA; PD-CBDM paper Sec. 3.4, eqs. 13-14).

    ``Q = W_q h + P_q temb``, ``K = W_k h + P_k temb``, ``V = W_v h + P_v temb``: a linear
    projection of the block's conditioning vector ``temb`` (B, temb_dim) is added to each of
    the 1x1 projections, broadcast over the H*W positions; then multi-head scaled dot-product
    attention as in :class:`SelfAttention` (the paper calls TSA multi-head, Sec. 1; the
    authors' code uses 8 heads, :class:`UNet`'s ``tsa_heads`` default). The three ``P`` start at
    zero, so a fresh TSA block computes exactly what :class:`SelfAttention` with the same
    weights and head count computes.
    """

    def __init__(
        self, channels: int, temb_dim: int, num_heads: int = 8, norm: NormFactory = group_norm
    ) -> None:
        super().__init__(channels, temb_dim, num_heads, norm)
        self.q_t = nn.Linear(temb_dim, channels)
        self.k_t = nn.Linear(temb_dim, channels)
        self.v_t = nn.Linear(temb_dim, channels)
        for layer in (self.q_t, self.k_t, self.v_t):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def project_qkv(self, h: Tensor, temb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        temb = temb.to(h.dtype)
        return (
            self.q(h) + self.q_t(temb)[:, :, None, None],
            self.k(h) + self.k_t(temb)[:, :, None, None],
            self.v(h) + self.v_t(temb)[:, :, None, None],
        )


# Attention variants by name: the ``attention`` argument of :class:`UNet`. A variant is a
# module ``cls(channels, temb_dim, num_heads=..., norm=...)`` whose forward is
# ``(x, temb) -> x``.
ATTENTION_BLOCKS: dict[str, type[nn.Module]] = {
    "self": SelfAttention,
    "tsa": TimestepSelfAttention,
}


def attention_class(name: str) -> type[nn.Module]:
    """The attention block class registered under ``name``; a clear error for unknown names."""
    try:
        return ATTENTION_BLOCKS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention {name!r}; registered: {sorted(ATTENTION_BLOCKS)}. "
            "Set model.attention to one of these, or register a new block in "
            "lt_diffusion.models.unet.ATTENTION_BLOCKS"
        ) from None


class ResBlock(nn.Module):
    """Ho et al.'s residual block, optionally followed by an attention block.

    ``GN -> SiLU -> conv3x3``, plus ``Linear(SiLU(temb))`` per channel, then
    ``GN -> SiLU -> Dropout -> conv3x3`` (small-gain init) and a 1x1 shortcut when the width
    changes. ``attn(out_ch, temb_dim)`` builds the attention block after it (``None``: none).
    The per-channel time shift reaches the output only if the second GroupNorm has more than
    one channel per group.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        dropout: float,
        attn: Callable[[int, int], nn.Module] | None = None,
        norm: NormFactory = group_norm,
    ) -> None:
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = attn(out_ch, temb_dim) if attn is not None else None
        for layer in (self.conv1, self.temb_proj, self.shortcut):
            if not isinstance(layer, nn.Identity):
                _xavier(layer)
        _xavier(self.conv2, gain=SMALL_GAIN)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + self.shortcut(x)
        if self.attn is not None:  # structural, fixed at build time: fine under torch.compile
            h = self.attn(h, temb)
        return h


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        _xavier(self.conv)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    joins_skip = False  # Backbone.skip_pass: only the residual blocks take a skip

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        _xavier(self.conv)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _as_int_tuple(value: Sequence[int], name: str) -> tuple[int, ...]:
    """A list / tuple / Hydra ListConfig of integers as a tuple; a clear error otherwise."""
    hint = f"{name} must be a list of integers, e.g. [1, 2, 2] or [], got {value!r}"
    if isinstance(value, int | float | str | bytes):
        raise ValueError(hint)
    try:
        items = list(value)
    except TypeError:
        raise ValueError(hint) from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(hint)
    return tuple(items)


class UNet(Backbone):
    """Class-conditional epsilon-prediction U-Net of Ho et al. (2020).

    Args:
        image_size: input height = width in pixels.
        in_channels: image channels (1 or 3); the output has the same number.
        ch: base width; even (the sinusoidal time embedding has ``ch`` features) and at least
            ``norm_group_min_channels``.
        ch_mult: width multiplier per resolution level; level ``i`` runs at
            ``image_size / 2**i``, so ``image_size`` must divide by ``2**(len(ch_mult)-1)``.
        attn_resolutions: resolutions (in pixels) whose residual blocks get an attention block
            of kind ``attention``; the middle block always has plain self-attention, as in
            Ho et al. (PD-CBDM puts TSA at 16x16 only).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        dropout: dropout probability inside the residual blocks.
        num_classes: number of real classes; embedding row ``num_classes`` is the null label.
        augment_dim: width of ADA's augmentation labels (9 in EDM's pipeline); 0 disables.
        attention: name of the attention block in :data:`ATTENTION_BLOCKS`.
        tsa_resolutions: resolutions whose residual blocks get PD-CBDM's
            :class:`TimestepSelfAttention` instead (``[16]`` for PD-CBDM); other
            ``attn_resolutions`` keep the ``attention`` block. Default empty: no TSA.
        attn_heads: heads of every plain attention block, the middle block's included
            (1: Ho et al.'s single-head attention).
        tsa_heads: heads of every :class:`TimestepSelfAttention` block (8: the PD-CBDM
            authors' code; the paper says multi-head without a number).
        norm_groups: the most GroupNorm groups a width gets (32: Ho et al.).
        norm_group_min_channels: the fewest channels a group keeps (4). Each GroupNorm takes
            :func:`norm_group_count` groups: 32 groups at Ho et al.'s widths (>= 128), fewer at
            narrow ones (8 groups of 4 at 32 channels), so a block's time / class shift is not
            normalised away.

    Module layout: ``head`` conv, ``down`` (res / attention / downsample blocks), ``mid``
    (two res blocks), ``up`` (the up-sampling half: res blocks on skip-concatenated features
    and upsamplers), ``tail`` (GN, SiLU, conv).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        attn_resolutions: Sequence[int] = (16,),
        num_res_blocks: int = 2,
        dropout: float = 0.1,
        num_classes: int = 10,
        augment_dim: int = 0,
        attention: str = "self",
        tsa_resolutions: Sequence[int] = (),
        attn_heads: int = 1,
        tsa_heads: int = 8,
        norm_groups: int = NORM_GROUPS,
        norm_group_min_channels: int = NORM_GROUP_MIN_CHANNELS,
    ) -> None:
        super().__init__()
        if image_size is None:  # the dataset gives vectors (dataset=toy2d, ...)
            raise ValueError(
                "the U-Net denoises images but the dataset has no image size (vector data): "
                "use model=mlp"
            )
        ch_mult = _as_int_tuple(ch_mult, "model.ch_mult")
        attn_resolutions = _as_int_tuple(attn_resolutions, "model.attn_resolutions")
        tsa_resolutions = _as_int_tuple(tsa_resolutions, "model.tsa_resolutions")
        visited = [image_size // 2**i for i in range(len(ch_mult))] if image_size > 0 else []
        bad_tsa = [r for r in tsa_resolutions if r not in visited]
        if bad_tsa:
            raise ValueError(
                f"model.tsa_resolutions {list(tsa_resolutions)} contains {bad_tsa}, which the "
                f"network never visits; the resolutions are {visited} (use a subset, or [])"
            )
        self._validate(
            image_size,
            in_channels,
            ch,
            ch_mult,
            attn_resolutions,
            num_res_blocks,
            dropout,
            num_classes,
            augment_dim,
        )
        attn_cls = attention_class(attention)
        if norm_groups < 1 or norm_group_min_channels < 1:
            raise ValueError(
                f"model.norm_groups and model.norm_group_min_channels must be >= 1, got "
                f"{norm_groups} and {norm_group_min_channels} (defaults: 32 and 4)"
            )
        if ch < norm_group_min_channels:
            raise ValueError(
                f"model.ch={ch} is narrower than one GroupNorm group of "
                f"model.norm_group_min_channels={norm_group_min_channels} channels: raise "
                "model.ch or lower model.norm_group_min_channels"
            )
        norm = partial(group_norm, max_groups=norm_groups, min_channels=norm_group_min_channels)

        def heads_key(cls: type[nn.Module]) -> tuple[int, str]:
            if issubclass(cls, TimestepSelfAttention):
                return tsa_heads, "model.tsa_heads"
            return attn_heads, "model.attn_heads"

        def block_attn(res: int) -> type[nn.Module] | None:
            if res in tsa_resolutions:
                return TimestepSelfAttention
            return attn_cls if res in attn_resolutions else None

        # Every attention width must split into its heads: check them all before building.
        placed = [(block_attn(image_size // 2**lvl), ch * m) for lvl, m in enumerate(ch_mult)]
        for cls, width in [*placed, (SelfAttention, ch * ch_mult[-1])]:
            if cls is None:
                continue
            heads, key = heads_key(cls)
            if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
                raise ValueError(f"{key} must be a positive integer, got {heads!r}")
            if width % heads != 0:
                raise ValueError(
                    f"{key}={heads} does not divide the width {width} of an attention block "
                    f"({cls.__name__}); use a divisor of {width}"
                )

        def attn_factory(res: int | None) -> Callable[[int, int], nn.Module] | None:
            cls = SelfAttention if res is None else block_attn(res)
            if cls is None:
                return None
            return partial(cls, num_heads=heads_key(cls)[0], norm=norm)

        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        self.augment_dim = int(augment_dim)
        self.ch = int(ch)
        self.num_levels = len(ch_mult)
        temb_dim = 4 * ch

        self.time_mlp = nn.Sequential(
            nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            _xavier(layer)
        # Default N(0, 1) init, as in CBDM's port (its initializer does not touch these).
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim)
        self.aug_emb = nn.Linear(augment_dim, temb_dim, bias=False) if augment_dim > 0 else None

        self.head = nn.Conv2d(in_channels, ch, 3, padding=1)
        _xavier(self.head)

        self.down = nn.ModuleList()
        skip_chs = [ch]  # widths of the features saved for the skip connections
        now_ch = ch
        for level, mult in enumerate(ch_mult):
            res = image_size // 2**level
            out_ch = ch * mult
            for _ in range(num_res_blocks):
                attn = attn_factory(res)
                self.down.append(ResBlock(now_ch, out_ch, temb_dim, dropout, attn, norm))
                now_ch = out_ch
                skip_chs.append(now_ch)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(now_ch))
                skip_chs.append(now_ch)

        self.mid = nn.ModuleList(
            [
                ResBlock(now_ch, now_ch, temb_dim, dropout, attn_factory(None), norm),
                ResBlock(now_ch, now_ch, temb_dim, dropout, None, norm),
            ]
        )
        self.bottleneck_channels = now_ch

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            res = image_size // 2**level
            out_ch = ch * mult
            for _ in range(num_res_blocks + 1):
                attn = attn_factory(res)
                in_ch = skip_chs.pop() + now_ch
                self.up.append(ResBlock(in_ch, out_ch, temb_dim, dropout, attn, norm))
                now_ch = out_ch
            if level != 0:
                self.up.append(Upsample(now_ch))
        assert not skip_chs, "every saved skip feature must be consumed"

        self.tail = nn.Sequential(
            norm(now_ch),
            nn.SiLU(),
            nn.Conv2d(now_ch, in_channels, 3, padding=1),
        )
        _xavier(self.tail[2], gain=SMALL_GAIN)

    @staticmethod
    def _validate(
        image_size: int,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        attn_resolutions: tuple[int, ...],
        num_res_blocks: int,
        dropout: float,
        num_classes: int,
        augment_dim: int,
    ) -> None:
        """Reject configurations that cannot build, with what to change."""
        if image_size < 1:
            raise ValueError(f"model.image_size must be positive, got {image_size}")
        if in_channels < 1:
            raise ValueError(f"model.in_channels must be positive, got {in_channels}")
        if ch < 2 or ch % 2 != 0:
            raise ValueError(
                f"model.ch must be a positive even number (the sinusoidal time embedding has "
                f"ch features), got {ch}; try {max(2, ch + ch % 2)}"
            )
        if not ch_mult or any(m < 1 for m in ch_mult):
            raise ValueError(
                f"model.ch_mult must be a non-empty list of positive integers, got {list(ch_mult)}"
            )
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor != 0:
            max_levels = 1
            while image_size % 2**max_levels == 0:
                max_levels += 1
            raise ValueError(
                f"model.ch_mult has {len(ch_mult)} levels, so image_size must be divisible by "
                f"{factor}, but it is {image_size}. For {image_size} px use at most "
                f"{max_levels} entries in ch_mult (e.g. {[1] + [2] * (max_levels - 1)})"
            )
        visited = [image_size // 2**i for i in range(len(ch_mult))]
        bad = [r for r in attn_resolutions if r not in visited]
        if bad:
            raise ValueError(
                f"model.attn_resolutions {list(attn_resolutions)} contains {bad}, which the "
                f"network never visits; with image_size {image_size} and {len(ch_mult)} levels "
                f"the resolutions are {visited} (use a subset of these, or [])"
            )
        if num_res_blocks < 1:
            raise ValueError(f"model.num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        if num_classes < 1:
            raise ValueError(
                f"model.num_classes must be >= 1, got {num_classes} (for an unconditional "
                "model use 1 class and always pass y=None)"
            )
        if augment_dim < 0:
            raise ValueError(f"model.augment_dim must be >= 0 (0 disables ADA), got {augment_dim}")

    def embed(self, t: Tensor, y: Tensor | None, aug_labels: Tensor | None) -> Tensor:
        """The conditioning vector ``MLP(sin(t)) + E[y] (+ A aug_labels)``, shape (B, 4ch)."""
        temb = timestep_embedding(t, self.ch).to(self.time_mlp[0].weight.dtype)
        temb = self.time_mlp(temb)
        return self.add_labels(temb, y, aug_labels)

    def denoise(
        self, x: Tensor, t: Tensor, y: Tensor | None, aug: Tensor | None, bottleneck: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict the noise in ``x`` (B, C, H, W) (see :meth:`Backbone.forward`); ``aug``
        (B, augment_dim) is ADA's augmentation description. The bottleneck is the feature map
        after the middle blocks, (B, C_mid, H / 2**(L-1), W / 2**(L-1))."""
        # Shape checks only (no tensor values): no host sync, no graph breaks on values.
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor != 0 or x.shape[3] % factor != 0:
            raise ValueError(
                f"x spatial size {tuple(x.shape[2:])} must be divisible by {factor} for "
                f"{self.num_levels} levels (the model was built for {self.image_size} px)"
            )
        h = self.head(x)
        h, h_mid = self.skip_pass(h, self.embed(t, y, aug), [h])  # the head's output is a skip
        eps = self.tail(h)
        return (eps, h_mid) if bottleneck else eps
