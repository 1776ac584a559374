"""The training set encoded once by a latent backbone's autoencoder, cached on disk.

What is stored is the autoencoder *posterior* of every training image, ``(mean, std)`` stacked on
channels and unscaled (``LatentBackbone.encode_moments``), and, when training flips images
horizontally, the posterior of every mirrored image too: the flip is applied to the pixels
before encoding, not to the latents (a KL autoencoder's latents are not mirror-equivariant).
A training step then draws ``z = mean + std * noise`` and scales it, at no autoencoder cost.

The file is keyed by everything the numbers depend on: a digest of the autoencoder's weights, a
digest of the training images and labels (the long-tailed subset itself, not its description),
the resolution and whether mirrored copies exist. The key's hash names the file and the key is
stored inside; a file whose stored key or shapes disagree is recomputed with a warning, never
trusted. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lt_diffusion.utils.io import atomic_torch_save

# Bump when what is stored changes: old files then miss the cache.
FORMAT_VERSION = 1


class StaleLatentCacheWarning(UserWarning):
    """A latent cache file was ignored (unreadable or not matching its key) and recomputed."""


class Encoder(Protocol):
    """What the cache needs from a backbone (``LatentBackbone`` provides it)."""

    vae: nn.Module

    def encode_moments(self, images: Tensor) -> Tensor: ...


def tensor_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """BLAKE2b (32 hex digits) of tensors' names, shapes, dtypes and bytes, in the given order.

    Bytes are hashed as stored (channels-last or not does not matter: a contiguous copy is
    hashed), so two equal state dicts give the same digest on any device.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """:func:`tensor_digest` of every parameter and persistent buffer of ``module``."""
    return tensor_digest(sorted(nn.Module.state_dict(module).items()))


@dataclass
class EncodedSet:
    """Posterior moments of the training images, ``(N, 2 C_z, h, w)`` float32 each."""

    moments: Tensor
    mirrored: Tensor | None


@torch.no_grad()
def encode_images(
    backbone: Encoder, images: Tensor, batch_size: int, device: torch.device, mirror: bool = False
) -> Tensor:
    """Posterior moments of uint8 images ``(N, C, H, W)``, on the CPU; ``mirror`` encodes the
    horizontally flipped images instead. Autocast is off: the cache is exact float32."""
    out = []
    with torch.autocast(device_type=device.type, enabled=False):
        for chunk in images.split(int(batch_size)):
            x = chunk.to(device).float().div_(127.5).sub_(1.0)
            if mirror:
                x = x.flip(3)
            out.append(backbone.encode_moments(x).float().cpu())
    return torch.cat(out)


def cache_key(backbone: Encoder, images: Tensor, labels: Tensor, mirror: bool) -> dict[str, Any]:
    """Everything the cached moments depend on (JSON-serialisable)."""
    return {
        "format": FORMAT_VERSION,
        "autoencoder": module_digest(backbone.vae),
        "data": tensor_digest([("images", images), ("labels", labels)]),
        "n": len(images),
        "image_shape": list(images.shape[1:]),
        "mirrored": bool(mirror),
    }


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return Path(cache_dir) / f"latents-{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt"


def _read(path: Path, key: dict[str, Any]) -> EncodedSet | None:
    """The cached set, or None (with a warning when a file exists but cannot be trusted)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(blob, dict) and blob.get("key") == key
        moments, mirrored = (blob["moments"], blob["mirrored"]) if ok else (None, None)
        ok = ok and moments.shape[0] == key["n"] and (mirrored is not None) == key["mirrored"]
        ok = ok and (mirrored is None or mirrored.shape == moments.shape)
    except Exception as err:  # truncated or foreign file
        warnings.warn(f"ignoring latent cache {path}: {err}", StaleLatentCacheWarning, stacklevel=3)
        return None
    if not ok:
        warnings.warn(
            f"ignoring latent cache {path}: its key or shapes do not match; re-encoding",
            StaleLatentCacheWarning,
            stacklevel=3,
        )
        return None
    return EncodedSet(moments, mirrored)


def encoded_training_set(
    backbone: Encoder,
    images: Tensor,
    labels: Tensor,
    *,
    mirror: bool,
    cache_dir: str | Path | None,
    device: torch.device,
    batch_size: int = 64,
    compute: bool = True,
) -> EncodedSet:
    """The training set's posterior moments: read from ``cache_dir`` or encoded (and written).

    Args:
        backbone: a latent backbone (``vae`` and ``encode_moments``).
        images: uint8 ``(N, C, H, W)`` training images (any device).
        labels: their int64 labels (part of the key: the subset, not only its pixels).
        mirror: also encode the horizontally mirrored images (training with ``hflip``).
        cache_dir: folder of the cache files; None encodes without caching.
        device: where to run the autoencoder.
        batch_size: images per autoencoder call.
        compute: False only reads (other DDP ranks, after rank 0 wrote the file).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"the latent cache encodes uint8 (N, C, H, W) images, got {images.dtype} "
            f"{tuple(images.shape)}: pass the datamodule's train_images"
        )
    key = cache_key(backbone, images, labels, mirror)
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None:
        cached = _read(path, key)
        if cached is not None:
            return cached
    if not compute:
        raise FileNotFoundError(
            f"latent cache {path} is missing after rank 0 wrote it: is model.latent_cache_dir "
            "on a filesystem that every process sees?"
        )
    moments = encode_images(backbone, images, batch_size, device)
    mirrored = encode_images(backbone, images, batch_size, device, mirror=True) if mirror else None
    if not (torch.isfinite(moments).all() and (mirrored is None or torch.isfinite(mirrored).all())):
        raise FloatingPointError(
            "the autoencoder gave non-finite latents for some training images: check the "
            "autoencoder weights (model.vae)"
        )
    if path is not None:
        atomic_torch_save({"key": key, "moments": moments, "mirrored": mirrored}, path)
    return EncodedSet(moments, mirrored)
