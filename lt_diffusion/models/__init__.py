"""Backbones mapping ``(x_t, t, y)`` to a prediction (DESIGN.md, step 2)."""

from lt_diffusion.models.unet import (
    ATTENTION_BLOCKS,
    ResBlock,
    SelfAttention,
    UNet,
    attention_class,
    timestep_embedding,
)

__all__ = [
    "ATTENTION_BLOCKS",
    "ResBlock",
    "SelfAttention",
    "UNet",
    "attention_class",
    "timestep_embedding",
]
