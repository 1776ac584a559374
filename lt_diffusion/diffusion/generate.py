"""Deterministic, split-invariant image generation.

The label list is cut into fixed chunks of ``batch_size``. Chunk ``k`` draws its initial noise
and every per-step noise from its own generator, seeded by a hash of ``(seed, k)`` on the
sampling device, and rank ``r`` of ``world_size`` takes the chunks with ``k % world_size == r``.
So the images do not depend on how the work is split: the per-rank outputs put back in chunk
order (:func:`gather_order`) equal the single-process result exactly, on the same device type.

Latent backbones (``model.latent_shape`` and ``model.decode_latents``,
:mod:`lt_diffusion.models.latent`) are sampled in latent space and decoded to images: the
caller still asks for the image shape. Latents are not bounded to ``[-1, 1]``, so their
reverse process runs without the samplers' pixel-range clamps (:func:`sample_unbounded`).

A caption-conditioned backbone (``model.sampling_captions``,
:class:`lt_diffusion.models.text_latent.TextLatentUNet`) gets one caption per label, drawn from
the chunk's generator before its reverse process and kept for all of its steps.

Models of vectors (``model.vector_dim``, :mod:`lt_diffusion.models.mlp`) are sampled with
:func:`generate_vectors`, which returns float points instead of uint8 images.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.diffusion.samplers import Sampler


def balanced_labels(num_classes: int, n_per_class: int) -> Tensor:
    """Exactly class-balanced labels ``[0]*n + [1]*n + ... + [C-1]*n`` (int64)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    return torch.arange(int(num_classes), dtype=torch.long).repeat_interleave(int(n_per_class))


def to_uint8(x: Tensor) -> Tensor:
    """Map floats in ``[-1, 1]`` to uint8: ``round((x + 1) * 127.5)`` clamped to ``[0, 255]``."""
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects float images in [-1, 1], got dtype {x.dtype}")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit generator seed for chunk ``chunk`` of a run seeded ``seed``.

    A cryptographic hash (not Python's salted ``hash``) so it is the same in every process,
    and nearby ``(seed, chunk)`` pairs give unrelated streams.
    """
    digest = hashlib.blake2b(f"lt-diffusion/{int(seed)}/{int(chunk)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def _check_split(n: int, batch_size: int, rank: int, world_size: int) -> None:
    if n < 0:
        raise ValueError(f"number of images must be >= 0, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def chunk_ranges(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` index ranges of the chunks rank ``rank`` generates, in chunk order.

    Chunk ``k`` covers ``[k * batch_size, min((k + 1) * batch_size, n))``; rank ``r`` takes
    the chunks with ``k % world_size == r``.
    """
    _check_split(n, batch_size, rank, world_size)
    num_chunks = -(-n // batch_size)
    return [
        (k * batch_size, min((k + 1) * batch_size, n)) for k in range(rank, num_chunks, world_size)
    ]


def rank_count(n: int, batch_size: int, rank: int, world_size: int) -> int:
    """How many images rank ``rank`` generates (to pad before an all_gather)."""
    return sum(end - start for start, end in chunk_ranges(n, batch_size, rank, world_size))


def gather_order(parts: Sequence[Tensor], n: int, batch_size: int) -> Tensor:
    """Put per-rank outputs back in global label order.

    Args:
        parts: ``parts[r]`` is rank ``r``'s output of :func:`generate` (``len(parts)`` is the
            world size). Rows past :func:`rank_count` (padding added for an all_gather of
            equal sizes) are ignored.
        n: total number of labels.
        batch_size: the chunk size used by :func:`generate`.
    """
    world_size = len(parts)
    if world_size < 1:
        raise ValueError("gather_order needs one output per rank, got none")
    per_rank = [chunk_ranges(n, batch_size, r, world_size) for r in range(world_size)]
    for r, (part, ranges) in enumerate(zip(parts, per_rank)):
        need = sum(end - start for start, end in ranges)
        if part.shape[0] < need:
            raise ValueError(
                f"rank {r} returned {part.shape[0]} images but must hold {need} "
                f"(n={n}, batch_size={batch_size}, world_size={world_size}): pass the same "
                "n and batch_size as generate() used"
            )
    out: list[Tensor] = []
    offsets = [0] * world_size
    for k in range(-(-n // batch_size)):
        r = k % world_size
        size = min((k + 1) * batch_size, n) - k * batch_size
        out.append(parts[r][offsets[r] : offsets[r] + size])
        offsets[r] += size
    if not out:
        return parts[0][:0]
    return torch.cat(out)


def is_latent_model(model: nn.Module) -> bool:
    """Whether ``model`` denoises latents that ``model.decode_latents`` turns into images
    (:class:`lt_diffusion.models.backbone.LatentSpace`)."""
    from lt_diffusion.models.backbone import LatentSpace

    return isinstance(model, LatentSpace)


@torch.inference_mode()
def sample_unbounded(
    sampler: Sampler,
    model: nn.Module,
    noise: Tensor,
    labels: Tensor,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The sampler's reverse process without the final clamp to ``[-1, 1]`` (for latents);
    x0-clipping options are refused since they assume pixel data."""
    if getattr(sampler, "clip_denoised", False):
        raise ValueError(
            "clip_denoised clips the predicted x0 to the pixel range [-1, 1], which latents "
            "do not live in: set sampler.sampler.clip_denoised=false for latent models"
        )
    return sampler.sample(model, noise, labels, guidance, generator, clamp=False)


def is_vector_model(model: nn.Module) -> bool:
    """Whether ``model`` denoises points in R^D (``model.vector_dim``), not images."""
    return getattr(model, "vector_dim", None) is not None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _check_labels(labels: Tensor, model: nn.Module) -> Tensor:
    """``labels`` as int64 on the CPU, or a clear error."""
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} and dtype "
            f"{labels.dtype}: use balanced_labels(num_classes, n_per_class)"
        )
    labels = labels.detach().to("cpu", torch.long)
    num_classes = getattr(model, "num_classes", None)
    if labels.numel() and (
        int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes)
    ):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]: the null label is not a class"
        )
    return labels


def _sample_chunks(
    model: nn.Module,
    labels: Tensor,
    noise_shape: tuple[int, ...],
    draw: Callable[[Tensor, Tensor, torch.Generator], Tensor],
    *,
    seed: int,
    batch_size: int,
    desc: str,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> list[Tensor]:
    """This rank's chunks in chunk order: chunk ``k`` draws its initial noise and every
    per-step noise from a generator seeded by ``chunk_seed(seed, k)``; ``draw(noise, y,
    generator)`` turns them into the chunk's output (on the CPU)."""
    ranges = chunk_ranges(labels.numel(), batch_size, rank, world_size)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(end - start for start, end in ranges)
        bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)
    try:
        for start, end in ranges:
            generator = torch.Generator(device=device)
            generator.manual_seed(chunk_seed(seed, start // batch_size))
            noise = torch.randn((end - start, *noise_shape), generator=generator, device=device)
            out.append(draw(noise, labels[start:end].to(device), generator))
            if bar is not None:
                bar.update(end - start)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def generate(
    model: nn.Module,
    sampler: Sampler,
    labels: Tensor,
    *,
    seed: int,
    batch_size: int,
    image_shape: tuple[int, int, int],
    guidance: float = 0.0,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Tensor:
    """Sample one image per label, deterministically from ``seed`` whatever the split.

    Args:
        model: ``model(x_t, t, y) -> eps`` (put in eval mode while sampling, then restored).
        sampler: a :class:`Sampler` built on the model's noise schedule.
        labels: int64 ``(N,)`` class labels, e.g. :func:`balanced_labels`.
        seed: run seed; chunk ``k`` uses ``chunk_seed(seed, k)``.
        batch_size: chunk size (images per sampler call). Changing it changes the images.
        image_shape: ``(C, H, W)`` of the images (of the decoded images for a latent model).
        guidance: classifier-free guidance weight ``w``.
        device: sampling device (default: the model's).
        rank, world_size: this process's share of the chunks.
        progress: show a progress bar over images.

    Returns:
        uint8 ``(N_rank, C, H, W)`` on the CPU, this rank's chunks in chunk order. A model of
        vectors is refused: :func:`generate_vectors` samples it.
    """
    if is_vector_model(model):
        raise ValueError(
            f"{type(model).__name__} denoises {model.vector_dim}-dimensional points, not "
            "images: sample it with generate_vectors (float points, no uint8 conversion)"
        )
    labels = _check_labels(labels, model)
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    image_shape = tuple(int(s) for s in image_shape)
    latent = is_latent_model(model)
    if latent:
        own = (int(model.in_channels), int(model.image_size), int(model.image_size))
        if image_shape != own:
            raise ValueError(
                f"image_shape {image_shape} differs from the images this latent model decodes "
                f"to, {own}: pass (model.in_channels, model.image_size, model.image_size)"
            )

    def draw(noise: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        captions = getattr(model, "sampling_captions", None)
        with captions(y, generator) if captions is not None else contextlib.nullcontext():
            if latent:
                x = model.decode_latents(
                    sample_unbounded(sampler, model, noise, y, guidance, generator)
                )
            else:
                x = sampler.sample(model, noise, y, guidance=guidance, generator=generator)
        return to_uint8(x).cpu()

    noise_shape = tuple(model.latent_shape) if latent else image_shape
    images = _sample_chunks(
        model, labels, noise_shape, draw, seed=seed, batch_size=batch_size, device=device,
        rank=rank, world_size=world_size, progress=progress, desc=f"sampling ({sampler.name})",
    )  # fmt: skip
    if not images:
        return torch.empty((0, *image_shape), dtype=torch.uint8)
    # Concatenated outside inference mode, so the caller gets an ordinary tensor.
    return torch.cat(images)


def generate_vectors(
    model: nn.Module, sampler: Sampler, labels: Tensor, *, guidance: float = 0.0, **chunking: Any
) -> Tensor:
    """Sample one point per label from a model of vectors (``model.vector_dim`` = D), with
    :func:`generate`'s chunking and seeding (the same points whatever the split): ``chunking``
    is its ``seed``, ``batch_size`` and optional ``device``, ``rank``, ``world_size``,
    ``progress``.

    Returns float32 ``(N_rank, D)`` on the CPU: the sampler's output as it is (clamped to
    ``[-1, 1]`` by :meth:`Sampler.sample`, the range the vector datasets keep to).
    """
    if not is_vector_model(model):
        raise ValueError(
            f"{type(model).__name__} has no vector_dim: it is not a model of vectors; sample "
            "images with generate"
        )
    labels = _check_labels(labels, model)
    dim = int(model.vector_dim)

    def draw(noise: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        x = sampler.sample(model, noise, y, guidance=guidance, generator=generator)
        return x.float().cpu()

    points = _sample_chunks(
        model, labels, (dim,), draw, desc=f"sampling ({sampler.name})", **chunking
    )
    return torch.cat(points) if points else torch.empty((0, dim))
