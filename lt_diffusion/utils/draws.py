"""The random draws of the training objectives, from one of two sources.

By default every draw is torch's own (the global generator, as ``torch.rand`` et al.), so the
Lightning training path is exactly what it would be without this module. Inside
:func:`keyed` the draws come instead from a **counter-based generator** keyed by a tensor: the
values are a pure function of ``(key, step, call, element)`` (the call counts the draws since
the context began), computed with integer tensor operations. That is what the seed-vectorised
toy training (:mod:`lt_diffusion.training.vectorized`) needs: under ``torch.func.vmap`` the key
is one integer per seed, so every seed draws its own numbers, and a seed's numbers do not
depend on which other seeds are trained beside it, nor on how many.

The hash is Thomas Mueller's 32-bit integer mix (``x = ((x >> 16) ^ x) * 0x45d9f3b`` twice,
then ``(x >> 16) ^ x``), a bijection of 32-bit words with full avalanche, applied to 32-bit
values held in int64 so that no product overflows (the constant is below 2^31). Uniforms take
the top 24 bits; normals are Box-Muller pairs of uniforms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_MUL = 0x45D9F3B
_GOLDEN = 0x9E3779B9  # decorrelates the key, step and call words before mixing


class _Keyed:
    """The state of one :func:`keyed` context: its key, step and the draws made so far."""

    def __init__(self, key: Tensor | int, step: int) -> None:
        # Once per context; a plain int key (one seed, no vmap) is mixed in Python.
        f = mix_int if isinstance(key, int) else mix
        base = key if isinstance(key, int) else key.long()
        self.base, self.mix = f(f(base & _MASK) ^ (int(step) & _MASK)), f
        self.calls = 0

    def words(self, n: int, device: torch.device) -> Tensor:
        """``n`` 32-bit words (int64 in ``[0, 2^32)``) of the next draw."""
        self.calls += 1
        start = self.mix(self.base ^ self.calls)
        index = torch.arange(n, device=device, dtype=torch.long)
        return mix(mix((start + index * _GOLDEN) & _MASK))


_ACTIVE: list[_Keyed] = []


def mix(x: Tensor) -> Tensor:
    """Mueller's 32-bit mix of int64 tensors holding values in ``[0, 2^32)``."""
    x = (((x >> 16) ^ x) * _MUL) & _MASK
    x = (((x >> 16) ^ x) * _MUL) & _MASK
    return (x >> 16) ^ x


def mix_int(x: int) -> int:
    """:func:`mix` of one Python integer in ``[0, 2^32)``."""
    x = (((x >> 16) ^ x) * _MUL) & _MASK
    x = (((x >> 16) ^ x) * _MUL) & _MASK
    return (x >> 16) ^ x


@contextmanager
def keyed(key: Tensor | int, step: int) -> Iterator[None]:
    """Draw from the counter-based generator of ``key`` (an integer, or an integer tensor:
    one per vmapped seed) at training step ``step`` inside the block; the same key gives the
    same numbers either way."""
    _ACTIVE.append(_Keyed(key, step))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> bool:
    """Whether draws come from a :func:`keyed` context."""
    return bool(_ACTIVE)


def _uniform(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    state = _ACTIVE[-1]
    n = math.prod(shape)
    bits = state.words(n, device) >> 8  # 24 bits: exact in float32
    return (bits.to(dtype) * (1.0 / 2**24)).reshape(tuple(shape))


def rand(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Uniforms in ``[0, 1)`` (``torch.rand`` outside :func:`keyed`)."""
    dtype = dtype or torch.get_default_dtype()
    if not _ACTIVE:
        return torch.rand(tuple(shape), device=device, dtype=dtype)
    return _uniform(shape, torch.device(device or "cpu"), dtype)


def rand_like(x: Tensor) -> Tensor:
    """``torch.rand_like(x)``, or keyed uniforms of ``x``'s shape and dtype."""
    if not _ACTIVE:
        return torch.rand_like(x)
    return _uniform(x.shape, x.device, x.dtype)


def randn_like(x: Tensor) -> Tensor:
    """``torch.randn_like(x)``, or keyed standard normals (Box-Muller) of ``x``'s shape."""
    if not _ACTIVE:
        return torch.randn_like(x)
    n = x.numel()
    u = _uniform((2, n), x.device, torch.float64)
    r = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: log is finite
    return (r * torch.cos(2.0 * math.pi * u[1])).to(x.dtype).reshape(x.shape)


def randint(
    low: int, high: int, shape: Sequence[int], device: torch.device | str | None = None
) -> Tensor:
    """Integers uniform in ``[low, high)``, int64 (``torch.randint`` outside :func:`keyed`;
    inside, ``floor(u (high - low))`` of a 24-bit uniform, so ``high - low`` up to a few
    thousand keeps the bias below 1e-4)."""
    if not _ACTIVE:
        return torch.randint(int(low), int(high), tuple(shape), device=device)
    u = _uniform(shape, torch.device(device or "cpu"), torch.float64)
    return int(low) + (u * (int(high) - int(low))).long()
