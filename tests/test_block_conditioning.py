"""Every residual block of every pixel / latent U-Net config uses its time and class input.

A block adds a per-channel shift (projection of the time + class embedding) before its second
GroupNorm. With one channel per group the norm subtracts that shift again, and the block
ignores ``t`` and ``y`` (what 32 groups at 32 channels did in unet_tiny / unet_small / ldm_tiny).
Each block is checked on its own: its recorded input is fed again with the embedding of another
``t`` (or ``y``), so a change cannot come from upstream blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lt_diffusion.models import LatentUNet, ResBlock, UNet
from lt_diffusion.models.unet import norm_group_count

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def _from_config(name: str, size: int, channels: int, **overrides) -> nn.Module:
    cfg = OmegaConf.merge(
        {"dataset": {"image_size": size, "channels": channels, "num_classes": 10}},
        {"model": OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml")},
        {"model": overrides},
    )
    return instantiate(cfg.model)


def _unit_gain(model: nn.Module) -> nn.Module:
    """Re-draw Ho et al.'s near-zero (gain 1e-5) output layers at unit gain and give biases
    random values, so a dependence is not hidden under the init's scale; float64, eval."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model.double().eval()


def _record_block_inputs(
    model: nn.Module, blocks: dict[str, nn.Module], x: torch.Tensor, t: torch.Tensor, y
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(h, temb)`` each block received in one forward pass."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        block.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], args[1]))
        )
        for name, block in blocks.items()
    ]
    try:
        with torch.no_grad():
            model(x, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen) == set(blocks)
    return seen


def _assert_every_block_uses_t_and_y(model: nn.Module, block_type: type, x: torch.Tensor) -> int:
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, block_type)}
    b = x.shape[0]
    t, y = torch.tensor([50, 700])[:b], torch.tensor([1, 3])[:b]
    base = _record_block_inputs(model, blocks, x, t, y)
    other_t = _record_block_inputs(model, blocks, x, t + 200, y)
    other_y = _record_block_inputs(model, blocks, x, t, y + 4)
    for name, block in blocks.items():
        h, temb = base[name]
        with torch.no_grad():
            out = block(h, temb)
            scale = out.abs().max()
            for what, temb2 in (("t", other_t[name][1]), ("y", other_y[name][1])):
                assert not torch.equal(temb2, temb)
                change = (block(h, temb2) - out).abs().max() / scale
                # float64: a shift the norm removes leaves ~1e-15; a used one changes O(1e-2+).
                assert change > 1e-6, f"{name} ignores {what} (relative change {change:.1e})"
    return len(blocks)


@pytest.mark.parametrize(
    "name,size,channels,overrides",
    [
        ("unet_tiny", 28, 1, {}),
        ("unet_small", 28, 1, {}),
        # unet_cifar's widths (ch 128) on fewer levels and blocks, at 8 px: cheap on a CPU.
        ("unet_cifar", 8, 3, {"ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]}),
    ],
)
def test_every_unet_residual_block_depends_on_t_and_y(
    name: str, size: int, channels: int, overrides: dict
) -> None:
    torch.manual_seed(0)
    model = _unit_gain(_from_config(name, size, channels, **overrides))
    assert isinstance(model, UNet)
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    n = _assert_every_block_uses_t_and_y(model, ResBlock, x)
    # down, middle and up blocks: all were checked.
    assert n == len([m for m in (*model.down, *model.mid, *model.up) if isinstance(m, ResBlock)])
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels // m.num_groups >= 4, (name, m)


class _LabelledUNet2D(nn.Module):
    """diffusers' UNet2DModel called as ``(x, t, y)``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=y).sample


def test_every_ldm_tiny_resnet_block_depends_on_t_and_y() -> None:
    """The same for the latent backbone's diffusers UNet2DModel (its ``norm_num_groups``)."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    model = _from_config("ldm_tiny", 16, 3)
    assert isinstance(model, LatentUNet)
    unet = _unit_gain(_LabelledUNet2D(model.unet))
    z = torch.randn(2, *model.latent_shape, dtype=torch.float64)
    n = _assert_every_block_uses_t_and_y(unet, ResnetBlock2D, z)
    assert n == sum(isinstance(m, ResnetBlock2D) for m in unet.modules()) > 0


def test_norm_group_count_keeps_ho_et_al_and_four_channels() -> None:
    # Ho et al.'s widths: 32 groups everywhere.
    assert [norm_group_count(c) for c in (128, 256, 384, 512)] == [32, 32, 32, 32]
    # Narrow widths: as many groups as keep 4 channels each.
    assert [norm_group_count(c) for c in (32, 64, 96)] == [8, 16, 24]
    # The most groups that divide the width: 48 -> 12 of 4; 30 -> 6 of 5; 7 -> 1 of 7.
    assert [norm_group_count(c) for c in (48, 30, 7)] == [12, 6, 1]
    assert norm_group_count(32, max_groups=32, min_channels=1) == 32  # the old behaviour
    with pytest.raises(ValueError, match="norm_group_min_channels"):
        norm_group_count(3)
