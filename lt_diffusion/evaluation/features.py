"""Features of uint8 images from torch-fidelity's extractors (Inception, DINOv2, VGG-16, CLIP:
:mod:`lt_diffusion.evaluation.extractors`).

The images go into torch-fidelity's extractor as they are: uint8, its own TF-1.x-compatible
bilinear resize (to 299 for Inception, 224 for the others; no antialias: the papers' numbers
were made that way; torchmetrics >= 1.8 antialiases by default, which shifts FID) and its own
scaling (Inception: ``(x - 128) / 128``; the others: ImageNet mean and std). Batches are fixed
(``batch_size`` consecutive images), so any split of the work that keeps the batches gives the
same features.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lt_diffusion.evaluation.extractors import space_of

POOL_DIM = 2048
LOGITS_LAYER = "logits_unbiased"  # the layer torch-fidelity's IS is computed from


def _check(images: Any, where: str) -> Tensor:
    if isinstance(images, (tuple, list)) and images and isinstance(images[0], Tensor):
        images = images[0]  # a (images, labels) batch from a DataLoader
    if not isinstance(images, Tensor):
        raise TypeError(f"{where}: expected a uint8 tensor (N, C, H, W), got {type(images)}")
    if images.dtype != torch.uint8:
        hint = ""
        if images.is_floating_point():
            hint = (
                " (float images in [-1, 1] convert with "
                "lt_diffusion.diffusion.generate.to_uint8: round((x + 1) * 127.5))"
            )
        raise TypeError(f"{where}: images must be uint8 in [0, 255], got {images.dtype}{hint}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{where}: images must be (N, 1 or 3, H, W) channels-first, got shape "
            f"{tuple(images.shape)}"
        )
    return images


def _batches(images: Tensor | Iterable[Any], batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        yield from _check(images, "extract_features").split(batch_size)
        return
    for i, batch in enumerate(images):
        yield from _check(batch, f"extract_features, batch {i}").split(batch_size)


@contextlib.contextmanager
def _full_fp32(device: torch.device, allow_tf32: bool) -> Iterator[None]:
    """Switch TF32 off on CUDA for the duration (PyTorch enables it for cuDNN convolutions by
    default; it rounds inputs to 10 mantissa bits, so features stop being float32-exact)."""
    if device.type != "cuda" or allow_tf32:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.inference_mode()
def extract_features(
    images: Tensor | Iterable[Any],
    extractor: nn.Module,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    allow_tf32: bool = False,
) -> dict[str, np.ndarray | None]:
    """Features of ``images``: the extractor's first layer (Inception's pool3, DINOv2's CLS
    token, VGG-16's fc2_relu, CLIP's embedding) and Inception's logits when it yields them.

    Args:
        images: uint8 ``(N, C, H, W)`` with C in {1, 3} (one channel is repeated to three), or
            an iterable of such batches (or of ``(images, labels, ...)`` tuples); any size.
        extractor: a torch-fidelity extractor (:func:`lt_diffusion.evaluation.extractors.load`,
            :func:`lt_diffusion.evaluation.inception.load_extractor`).
        batch_size: images per forward pass (larger incoming batches are split).
        device: where to run; default: the extractor's device.
        progress: show a progress bar.
        allow_tf32: on CUDA, let convolutions use TF32 (faster on Ampere and later, but the
            features are no longer float32-exact); default off.

    Returns:
        ``{"pool": float64 (N, D), "logits": float64 (N, 1008) or None}``: "pool" holds the
        first layer's features (D = 2048 for Inception); logits when the extractor was built
        with them (``load_extractor(..., want_logits=True)`` and weights that have them). Zero
        images give ``(0, D)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = list(getattr(extractor, "features_list", ()))
    if not layers or layers[0] == LOGITS_LAYER:
        raise ValueError(
            f"the extractor yields {layers}, not a feature layer first: build it with "
            "lt_diffusion.evaluation.extractors.load"
        )
    layer = layers[0]
    space = space_of(getattr(extractor, "name", ""))
    if device is None:  # the extractor's own (a parameter's, else a buffer's)
        tensor = next(itertools.chain(extractor.parameters(), extractor.buffers()), None)
        device = tensor.device if tensor is not None else "cpu"
    device = torch.device(device)
    want_logits = LOGITS_LAYER in layers
    total = len(images) if isinstance(images, Tensor) else None
    pools: list[Tensor] = []
    logits: list[Tensor] = []
    with contextlib.ExitStack() as stack:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            what = f"{space.name} features" if space else "features"
            bar = stack.enter_context(tqdm(total=total, desc=what, unit="img", leave=False))
        stack.enter_context(_full_fp32(device, allow_tf32))
        for batch in _batches(images, batch_size):
            x = batch.to(device, non_blocking=True)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # grayscale: the same plane in R, G and B
            out = dict(zip(layers, extractor(x)))
            pools.append(out[layer].double().cpu())
            if want_logits:
                logits.append(out[LOGITS_LAYER].double().cpu())
            if bar is not None:
                bar.update(len(batch))
    pool = torch.cat(pools).numpy() if pools else np.zeros((0, space.dim if space else 0))
    if not want_logits:
        return {"pool": pool, "logits": None}
    return {"pool": pool, "logits": torch.cat(logits).numpy() if logits else np.zeros((0, 1008))}
