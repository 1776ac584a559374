"""Cross-attention of a diffusers U-Net, recorded per head and ablated per head, through
diffusers' attention-processor interface (``unet.set_attn_processor``), not forked model code.

:class:`CrossAttentionProbe` puts a :class:`ProbeProcessor` on every cross-attention layer (the
``attn2`` of each transformer block: queries from the image, keys and values from the text)
and leaves self-attention as it was. The processor computes what diffusers' default processor
computes (Vaswani et al.'s ``softmax(q k^T / sqrt(d)) v`` per head, then ``to_out``), but with
the attention probabilities made explicit (float32 softmax), so that it can

* record, per call, the attention **mass** each text token receives from the image:
  ``mass[b, h, j] = mean_q P[b, h, q, j]``. The softmax runs over the tokens, so a head's
  masses sum to one over the tokens (every token, start and padding included);
* **ablate** heads: a head's output ``P v`` is multiplied by its entry of ``head_mask`` (0
  zeroes the head) before the heads are merged, so an ablation changes that head's output
  and nothing else in that layer (later layers see the change).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class ProbeProcessor:
    """A diffusers attention processor that records token masses and applies head masks for
    one layer of a :class:`CrossAttentionProbe`."""

    def __init__(self, probe: CrossAttentionProbe, layer: str) -> None:
        self.probe = probe
        self.layer = layer

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split(x: Tensor) -> Tensor:  # (B, N, heads * d) -> (B, heads, N, d)
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(dim=-1)  # (B, heads, queries, tokens)
        self.probe.observe(self.layer, probs)
        out = (probs.to(value.dtype) @ value).to(query.dtype)  # (B, heads, queries, d)
        gate = self.probe.head_mask.get(self.layer)
        if gate is not None:
            out = out * gate.to(device=out.device, dtype=out.dtype).view(1, heads, 1, 1)
        self.probe.observe_heads(self.layer, out)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CrossAttentionProbe:
    """Records and ablates the cross-attention heads of a diffusers U-Net (see the module
    docstring). Use as a context manager: inside, the cross-attention layers run
    :class:`ProbeProcessor`; on exit the U-Net's own processors are back.

    Attributes:
        layers: the cross-attention layers by name (``down_blocks.0.attentions.0.
            transformer_blocks.0.attn2``), in the U-Net's module order.
        heads: number of heads of each layer.
        recording: whether calls are recorded (:meth:`take` returns and clears them).
        head_mask: layer name -> ``(heads,)`` factors on each head's output (absent: all 1).
        keep_head_outputs: also record each head's output ``P v`` (tests, diagnostics).
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        cross = {
            name: module
            for name, module in unet.named_modules()
            if getattr(module, "is_cross_attention", False) and hasattr(module, "processor")
        }
        if not cross:
            raise ValueError(
                f"{type(unet).__name__} has no cross-attention layers: the concept analysis needs "
                "a text-conditioned diffusers U-Net (model=sd_lora)"
            )
        self.layers = list(cross)
        self.heads = {name: int(m.heads) for name, m in cross.items()}
        self.recording = False
        self.keep_head_outputs = False
        self.head_mask: dict[str, Tensor] = {}
        self._masses: dict[str, list[Tensor]] = {}
        self._head_outputs: dict[str, list[Tensor]] = {}
        self._saved: dict[str, Any] | None = None

    # -- installing ----------------------------------------------------------------------------
    def __enter__(self) -> CrossAttentionProbe:
        saved = dict(self.unet.attn_processors)
        mine = {f"{name}.processor": ProbeProcessor(self, name) for name in self.layers}
        self.unet.set_attn_processor({k: mine.get(k, v) for k, v in saved.items()})
        self._saved = saved
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    # -- recording -----------------------------------------------------------------------------
    def observe(self, layer: str, probs: Tensor) -> None:
        if self.recording:  # mean over the image positions: each head's mass per token
            self._masses.setdefault(layer, []).append(probs.mean(dim=2).detach())

    def observe_heads(self, layer: str, out: Tensor) -> None:
        if self.recording and self.keep_head_outputs:
            self._head_outputs.setdefault(layer, []).append(out.detach())

    def take(self) -> dict[str, Tensor]:
        """The recorded masses since the last call, layer -> ``(calls * B, heads, tokens)``
        (one entry per recorded call, concatenated over the batch), and clear them."""
        out = {name: torch.cat(v) for name, v in self._masses.items()}
        self._masses = {}
        return out

    def take_head_outputs(self) -> dict[str, Tensor]:
        """Recorded head outputs, layer -> ``(calls * B, heads, queries, d)``; cleared."""
        out = {name: torch.cat(v) for name, v in self._head_outputs.items()}
        self._head_outputs = {}
        return out

    # -- ablating ------------------------------------------------------------------------------
    def head_index(self) -> list[tuple[str, int]]:
        """Every head as ``(layer, head)``, layer by layer."""
        return [(name, h) for name in self.layers for h in range(self.heads[name])]

    @contextmanager
    def ablated(self, heads: Mapping[str, list[int]] | list[tuple[str, int]]) -> Iterator[None]:
        """Zero the outputs of ``heads`` (``[(layer, head), ...]`` or ``{layer: [heads]}``)
        inside the block."""
        pairs = heads.items() if isinstance(heads, Mapping) else _group(heads).items()
        before = self.head_mask
        mask = dict(before)
        for layer, hs in pairs:
            if layer not in self.heads:
                raise KeyError(f"{layer!r} is not a cross-attention layer of this U-Net")
            gate = mask.get(layer, torch.ones(self.heads[layer])).clone()
            gate[list(hs)] = 0.0
            mask[layer] = gate
        self.head_mask = mask
        try:
            yield
        finally:
            self.head_mask = before


def _group(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(layer, []).append(int(head))
    return out
