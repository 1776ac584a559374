"""Cache of real-image Inception features (and FID statistics), keyed by everything they
depend on.

The key names the dataset, which subset of it (class list, split, balanced set...), the
resolution and the number of images; :func:`reference_features` adds the extractor's weights
hash and :data:`FORMAT_VERSION`. Its hash names the ``.npz`` file and the key itself is stored
inside; a file whose stored key differs, whose arrays do not fit the key, or that cannot be read
is recomputed (with a warning), never trusted. So a different subset can never reuse stale
statistics.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lt_diffusion.evaluation.features import POOL_DIM, extract_features
from lt_diffusion.evaluation.metrics import Statistics, statistics
from lt_diffusion.utils.io import atomic_open

# Bump when the stored arrays or the feature pipeline change: old files then miss the cache.
FORMAT_VERSION = 1
REQUIRED_KEY_FIELDS = ("dataset", "subset", "image_size", "n")


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


def full_key(key: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """``key`` plus what every cached feature depends on besides the images: the extractor
    (name and weights SHA-256) and the file format version."""
    missing = [k for k in REQUIRED_KEY_FIELDS if k not in key]
    if missing:
        raise ValueError(
            f"reference cache key lacks {missing}: it must name {list(REQUIRED_KEY_FIELDS)} "
            "(e.g. subset={'classes': [0, 1, 2]} or 'balanced-train'), so that a different "
            "subset can never reuse these statistics"
        )
    n = key["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"reference cache key: n must be a positive int, got {n!r}")
    if "weights_sha256" not in info:
        raise ValueError("extractor info lacks weights_sha256: pass load_extractor's info")
    reserved = {"extractor", "extractor_sha256", "format"} & set(key)
    if reserved:
        raise ValueError(f"reference cache key must not set {sorted(reserved)}: they are added")
    out = dict(key)
    out.update(
        extractor=info.get("name", "inception-v3-compat"),
        extractor_sha256=info["weights_sha256"],
        format=FORMAT_VERSION,
    )
    canonical(out)  # fail early on non-JSON values
    return out


def cache_path(key: dict[str, Any], cache_dir: str | Path) -> Path:
    """``<cache_dir>/reference/<dataset>-<hash>.npz`` for a full key."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key.get("dataset", "features")))[:40]
    return Path(cache_dir).expanduser() / "reference" / f"{name}-{key_hash(key)}.npz"


@dataclass
class ReferenceFeatures:
    """Pool features (float64, (n, 2048)) of a real set, with lazily computed statistics."""

    pool: np.ndarray
    key: dict[str, Any]
    path: Path
    from_cache: bool
    _stats: Statistics | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.pool)

    @property
    def stats(self) -> Statistics:
        """FID statistics (float64), from the file when it holds them."""
        if self._stats is None:
            self._stats = statistics(self.pool)
        return self._stats


class _Stale(Exception):
    pass


def _load(
    path: Path, key_json: str, n: int | None, dim: int | None
) -> tuple[np.ndarray, Statistics | None]:
    """Arrays of a cache file that matches ``key_json``; raises ``_Stale`` with the reason."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = str(f["key"])
            if stored != key_json:
                raise _Stale("its stored key differs (hash collision or a renamed file)")
            pool = np.asarray(f["pool"], dtype=np.float64)
            mu = np.asarray(f["mu"], np.float64) if "mu" in f.files else None
            sigma = np.asarray(f["sigma"], np.float64) if "sigma" in f.files else None
    except _Stale:
        raise
    except Exception as err:  # zip / npy format errors of any kind: the file is unusable
        raise _Stale(f"it cannot be read ({type(err).__name__}: {err})") from err
    if (
        pool.ndim != 2
        or (dim is not None and pool.shape[1] != dim)
        or (n is not None and len(pool) != n)
    ):
        raise _Stale(f"its features have shape {pool.shape}, expected ({n}, {dim})")
    if not np.isfinite(pool).all():
        raise _Stale("its features contain NaN or inf")
    stats = None
    if mu is not None and sigma is not None:
        d = pool.shape[1]
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise _Stale("its statistics have the wrong shape")
        if len(pool) > 0 and not np.allclose(mu, pool.mean(0), rtol=1e-6, atol=1e-9):
            raise _Stale("its mean does not match its features")
        stats = Statistics(mu, sigma, len(pool))
    return pool, stats


def _save(path: Path, key_json: str, pool: np.ndarray, stats: Statistics | None) -> None:
    arrays: dict[str, np.ndarray] = {"key": np.array(key_json)}
    # Inception features are float32 inside the network: store float32 when that is lossless.
    pool32 = pool.astype(np.float32)
    arrays["pool"] = pool32 if np.array_equal(pool32, pool) else pool
    if stats is not None:
        arrays.update(mu=stats.mu, sigma=stats.sigma)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _try_load(
    path: Path, key_json: str, n: int | None, dim: int | None
) -> tuple[np.ndarray, Statistics | None]:
    """Cached arrays, or raises ``_Stale`` (warning when an existing file is rejected)."""
    if not path.is_file():
        raise _Stale("missing")
    try:
        return _load(path, key_json, n, dim)
    except _Stale as why:
        warnings.warn(
            f"ignoring reference cache {path}: {why}; recomputing", StaleCacheWarning, stacklevel=3
        )
        raise


def reference_features(
    key: dict[str, Any],
    images_fn: Callable[[], Tensor],
    extractor: nn.Module,
    info: dict[str, Any],
    cache_dir: str | Path,
    *,
    batch_size: int = 200,
    device: str | torch.device | None = None,
    progress: bool = False,
    with_stats: bool = True,
) -> ReferenceFeatures:
    """Inception pool features of a real image set, computed once per key.

    Args:
        key: what the images are: at least ``dataset`` (name), ``subset`` (e.g.
            ``{"classes": [0, 1, 2]}``, ``"many"``, ``"balanced-train"``), ``image_size`` and
            ``n`` (number of images); add anything else they depend on (a seed, a split file).
        images_fn: returns the images (uint8 ``(n, C, H, W)``); called only on a cache miss.
        extractor, info: from :func:`lt_diffusion.evaluation.inception.load_extractor`.
        cache_dir: the cache root (files go to ``<cache_dir>/reference/``).
        with_stats: also store the FID statistics (32 MB per file at 2048-d: worth it for large
            sets; for small per-class sets pass False and let ``.stats`` compute them).

    Raises ValueError when the images do not match the key (count, resolution), before any
    feature is extracted.
    """
    fk = full_key(key, info)
    key_json = canonical(fk)
    path = cache_path(fk, cache_dir)
    try:
        pool, stats = _try_load(path, key_json, fk["n"], POOL_DIM)
    except _Stale:
        pass
    else:
        if stats is None and with_stats:
            stats = statistics(pool)
            _save(path, key_json, pool, stats)
        return ReferenceFeatures(pool, fk, path, True, stats)

    images = images_fn()
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images_fn must return a uint8 (N, C, H, W) tensor, got {type(images)}")
    if len(images) != fk["n"]:
        raise ValueError(
            f"the reference key says n={fk['n']} but images_fn returned {len(images)} images: "
            "build the key from the images it describes"
        )
    size = fk["image_size"]
    if isinstance(size, int) and tuple(images.shape[-2:]) != (size, size):
        raise ValueError(
            f"the reference key says image_size={size} but the images are "
            f"{tuple(images.shape[-2:])}"
        )
    pool = extract_features(images, extractor, batch_size, device, progress)["pool"]
    stats = statistics(pool) if with_stats else None
    _save(path, key_json, pool, stats)
    return ReferenceFeatures(pool, fk, path, False, stats)


def cached_features(
    key: dict[str, Any], compute: Callable[[], np.ndarray], cache_dir: str | Path
) -> np.ndarray:
    """Lower-level cache: ``compute()`` (features (N, 2048)) once per ``key``; later calls with
    the same key read ``<cache_dir>/real_features/<hash>.npz``. The caller's key must include
    everything the features depend on (extractor weights hash included); returns float64."""
    key_json = canonical(key)
    path = Path(cache_dir).expanduser() / "real_features" / f"{key_hash(key)}.npz"
    try:
        return _try_load(path, key_json, None, None)[0]
    except _Stale:
        pass
    pool = np.asarray(compute(), dtype=np.float64)
    if pool.ndim != 2:
        raise ValueError(f"compute() returned features of shape {pool.shape}, not (N, D)")
    _save(path, key_json, pool, None)
    return pool


def choose_real(n_available: int, n_wanted: int | None, seed: int) -> Tensor:
    """Indices (sorted) of the real images used: all, or a seeded random ``n_wanted``."""
    if n_wanted is None or n_wanted >= n_available:
        return torch.arange(n_available)
    if n_wanted < 0:
        raise ValueError(f"n_wanted must be >= 0, got {n_wanted}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_available, generator=g)[:n_wanted].sort().values
