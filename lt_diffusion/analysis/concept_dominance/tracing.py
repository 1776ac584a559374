"""Concept dominance: sampling with the cross-attention probe (each step's concept shares
per layer and head), with the LoRA adapters scaled."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.analysis.attention import CrossAttentionProbe
from lt_diffusion.analysis.common import (
    progress,
)
from lt_diffusion.analysis.concept_dominance.settings import NOISE_STREAM
from lt_diffusion.data.datamodule import stream_seed


@contextmanager
def lora_scaled(model: nn.Module, scale: float) -> Iterator[None]:
    """Every LoRA adapter of ``model`` at ``scale`` times its current scale inside the block
    (0: the pretrained weights the adapters were added to)."""
    layers = model.lora_layers() if hasattr(model, "lora_layers") else []
    if float(scale) != 1.0 and not layers:
        raise ValueError(
            f"analysis.lora_scale={scale} but the model has no LoRA adapters (fine-tuned "
            "without model.lora): leave it at 1"
        )
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for adapter in layer.scaling:
            layer.scaling[adapter] *= float(scale)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


class PromptConditioned(nn.Module):
    """``model(x, t, y)`` for the samplers, ``y`` indexing the rows of ``embeds`` (the last is
    the empty prompt, the null label). Each call's concept masses are taken from the probe."""

    def __init__(
        self, backbone: nn.Module, embeds: Tensor, select: Tensor, probe: CrossAttentionProbe
    ) -> None:
        super().__init__()
        self.unet = backbone.unet
        self.embeds = embeds  # (P + 1, L, D)
        self.select = select  # (P, K, L): 1 where a token belongs to a concept
        self.null_label = len(embeds) - 1
        self.probe = probe
        self.masses: list[Tensor] = []  # per call: (n, heads, K) for the conditional rows
        self.states: list[tuple[Tensor, Tensor]] | None = None  # (x_t, t) per call when kept
        self.mass_error = 0.0  # largest |sum over tokens of a head's masses - 1|

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.probe.recording = True
        eps = self.unet(x, t, encoder_hidden_states=self.embeds[y]).sample
        taken = self.probe.take()
        cond = y != self.null_label
        mass = torch.cat([taken[layer] for layer in self.probe.layers], dim=1)[cond]
        self.mass_error = max(self.mass_error, float((mass.double().sum(-1) - 1).abs().max()))
        sel = self.select.to(mass.device)[y[cond]]
        self.masses.append(torch.einsum("bhl,bkl->bhk", mass.double(), sel.double()).cpu())
        if self.states is not None:
            self.states.append((x[cond].clone(), t[cond].clone()))
        return eps


@dataclass
class Trace:
    """What sampling a set of (prompt, image) samples gave."""

    masses: Tensor  # (N, steps, heads, K) float64 concept masses
    final: Tensor  # (N, C, h, w) final latents
    states: list[tuple[Tensor, Tensor]] | None  # per step: (x_t (N, ...), t (N,)) when kept

    @property
    def shares(self) -> Tensor:
        return self.masses / self.masses.sum(-1, keepdim=True)


class Tracer:
    """Samples (prompt, image) pairs with fixed noise per image index and records every
    conditional forward's concept masses."""

    def __init__(
        self,
        model: nn.Module,
        conditioned: PromptConditioned,
        sampler: Any,
        guidance: float,
        seed: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        show_progress: bool,
    ) -> None:
        self.model, self.net, self.sampler = model, conditioned, sampler
        self.guidance, self.seed, self.batch = float(guidance), int(seed), max(1, int(batch))
        self.device, self.dtype, self.show_progress = device, dtype, show_progress

    def noise(self, image: int) -> Tensor:
        """The initial latent of image ``image``: the same for every prompt (common random
        numbers: prompts, orders, ablations and lora scales are compared on the same noise)."""
        g = torch.Generator().manual_seed(stream_seed(self.seed, NOISE_STREAM, image))
        return torch.randn(self.model.latent_shape, generator=g)

    def run(self, samples: Sequence[tuple[int, int]], keep_states: bool = False, desc: str = ""):
        masses, finals, states = [], [], []
        chunks = [samples[i : i + self.batch] for i in range(0, len(samples), self.batch)]
        for chunk in progress(chunks, desc or "concept attention", self.show_progress):
            y = torch.tensor([p for p, _ in chunk], device=self.device)
            x = torch.stack([self.noise(i) for _, i in chunk]).to(self.device, self.dtype)
            self.net.masses, self.net.states = [], [] if keep_states else None
            finals.append(
                self.sampler.sample(self.net, x, y, self.guidance, clamp=False).float().cpu()
            )
            masses.append(torch.stack(self.net.masses, dim=1))  # (n, steps, heads, K)
            if keep_states:
                states.append(self.net.states)
        kept = None
        if keep_states:  # per step, the chunks' states concatenated
            kept = [
                (torch.cat([c[s][0] for c in states]), torch.cat([c[s][1] for c in states]))
                for s in range(len(states[0]))
            ]
        return Trace(torch.cat(masses), torch.cat(finals), kept)

    def eps_at(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The guided noise prediction on given states, with its concept masses (heads, K)."""
        from lt_diffusion.diffusion import guided_eps

        eps, masses = [], []
        for i in range(0, len(y), self.batch):
            sl = slice(i, i + self.batch)
            self.net.masses, self.net.states = [], None
            eps.append(guided_eps(self.net, x[sl], t[sl], y[sl], self.guidance).float().cpu())
            masses.append(self.net.masses[0])
        return torch.cat(eps), torch.cat(masses)
