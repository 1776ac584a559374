"""Cache of real-image Inception features, keyed by everything they depend on.

The caller's key names the pixels (their SHA-256), the dataset, class, count, seed and the
extractor's weights hash; :data:`FORMAT_VERSION` is added. Its hash names the ``.npz`` file and
the key itself is stored inside; a file whose stored key differs, whose arrays do not fit, or
that cannot be read is recomputed (with a warning), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lt_diffusion.utils.io import atomic_open

# Bump when the stored arrays or the feature pipeline change: old files then miss the cache.
FORMAT_VERSION = 1


class StaleCacheWarning(UserWarning):
    """A cache file was ignored (unreadable or not matching its key) and is being recomputed."""


def canonical(key: dict[str, Any]) -> str:
    """The key as canonical JSON (sorted keys, no spaces): what is hashed and stored."""
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"cache key must be JSON-serialisable (str, int, list, dict): {err}"
        ) from err


def key_hash(key: dict[str, Any]) -> str:
    """20 hex digits of the SHA-256 of the canonical key."""
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:20]


def cache_key(**parts: Any) -> dict[str, Any]:
    """A key with the format version included (for :func:`cached_features`)."""
    return {"format": FORMAT_VERSION, **parts}


class _Stale(Exception):
    pass


def _load(path: Path, key_json: str) -> np.ndarray:
    """The features of a cache file that matches ``key_json``; raises ``_Stale`` with why."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key_json:
                raise _Stale("its stored key differs (hash collision or a renamed file)")
            pool = np.asarray(f["pool"], dtype=np.float64)
    except _Stale:
        raise
    except Exception as err:  # zip / npy format errors of any kind: the file is unusable
        raise _Stale(f"it cannot be read ({type(err).__name__}: {err})") from err
    if pool.ndim != 2:
        raise _Stale(f"its features have shape {pool.shape}, not (N, D)")
    if not np.isfinite(pool).all():
        raise _Stale("its features contain NaN or inf")
    return pool


def cached_features(
    key: dict[str, Any], compute: Callable[[], np.ndarray], cache_dir: str | Path
) -> np.ndarray:
    """``compute()`` (features (N, D)) once per ``key``; later calls with the same key read
    ``<cache_dir>/real_features/<hash>.npz``. The caller's key must include everything the
    features depend on (pixels, extractor weights); returns float64. A file that cannot be used
    is recomputed with a :class:`StaleCacheWarning`."""
    key_json = canonical(key)
    path = Path(cache_dir).expanduser() / "real_features" / f"{key_hash(key)}.npz"
    if path.is_file():
        try:
            return _load(path, key_json)
        except _Stale as why:
            warnings.warn(
                f"ignoring reference cache {path}: {why}; recomputing", StaleCacheWarning, 2
            )
    pool = np.asarray(compute(), dtype=np.float64)
    if pool.ndim != 2:
        raise ValueError(f"compute() returned features of shape {pool.shape}, not (N, D)")
    # Inception features are float32 inside the network: store float32 when that is lossless.
    pool32 = pool.astype(np.float32)
    with atomic_open(path, "wb") as f:
        np.savez(f, key=np.array(key_json), pool=pool32 if np.array_equal(pool32, pool) else pool)
    return pool


def choose_real(n_available: int, n_wanted: int | None, seed: int) -> Tensor:
    """Indices (sorted) of the real images used: all, or a seeded random ``n_wanted``."""
    if n_wanted is None or n_wanted >= n_available:
        return torch.arange(n_available)
    if n_wanted < 0:
        raise ValueError(f"n_wanted must be >= 0, got {n_wanted}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_available, generator=g)[:n_wanted].sort().values
