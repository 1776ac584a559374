"""Backbones mapping ``(x_t, t, y)`` to a prediction (DESIGN.md, step 2)."""

from lt_diffusion.models.concept_pair_mlp import ConceptPairMLP
from lt_diffusion.models.latent import LatentBackbone, LatentUNet, load_autoencoder
from lt_diffusion.models.latent_cache import EncodedSet, encoded_training_set
from lt_diffusion.models.mlp import MLPDenoiser
from lt_diffusion.models.stable_diffusion import (
    ExpertAdapterSwitch,
    StableDiffusionBackbone,
    add_expert_adapter,
    check_pretrained_folder,
    merge_lora,
)
from lt_diffusion.models.text_latent import TextLatentUNet, load_text_encoder
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
    "ConceptPairMLP",
    "EncodedSet",
    "ExpertAdapterSwitch",
    "LatentBackbone",
    "LatentUNet",
    "MLPDenoiser",
    "ResBlock",
    "SelfAttention",
    "StableDiffusionBackbone",
    "TextLatentUNet",
    "UNet",
    "add_expert_adapter",
    "attention_class",
    "check_pretrained_folder",
    "encoded_training_set",
    "load_autoencoder",
    "load_text_encoder",
    "merge_lora",
    "timestep_embedding",
]
