"""The project's cache root, shared by everything computed once and reused (converted Inception
weights, real-image features, encoded latents, prepared dataset copies): the same folder as
``paths.cache_dir`` in ``configs/paths/default.yaml``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LT_DIFFUSION_CACHE"


def default_cache_dir() -> Path:
    """``$LT_DIFFUSION_CACHE``, else ``~/.cache/lt_diffusion``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lt_diffusion"
