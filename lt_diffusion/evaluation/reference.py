"""Cache of real-image Inception features, keyed by everything they depend on.

The key (dataset, class, number and choice of images, resolution, extractor weights, format
version) is hashed into the file name and stored inside the file; a file whose stored key
differs, or that cannot be read, is recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lt_diffusion.utils.io import atomic_write_bytes

FORMAT_VERSION = 1


def cache_key(**parts: Any) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, **parts}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(
    key: dict[str, Any], compute: Callable[[], np.ndarray], cache_dir: str | Path
) -> np.ndarray:
    """``compute()`` once per key; later calls with the same key read the cache."""
    path = Path(cache_dir) / "real_features" / f"{key_hash(key)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["key"])) == key:
                    return f["pool"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign: recompute below
    pool = np.asarray(compute(), dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, pool=pool, key=np.array(json.dumps(key, sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())
    return pool


def choose_real(n_available: int, n_wanted: int | None, seed: int) -> torch.Tensor:
    """Indices of the real images used: all, or a seeded subset of ``n_wanted``."""
    if n_wanted is None or n_wanted >= n_available:
        return torch.arange(n_available)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_available, generator=g)[:n_wanted].sort().values
