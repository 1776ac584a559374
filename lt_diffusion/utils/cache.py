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


def staged_weights(env_var: str, filename: str, error: type[Exception]) -> Path | None:
    """A weights file the user staged (nothing here downloads): ``$env_var`` when set (``error``
    when it names no file), else torch hub's ``checkpoints/<filename>``; None when neither."""
    env = os.environ.get(env_var)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise error(
                f"{env_var}={env} does not exist: point it at {filename}, or unset it to use "
                "torch hub's checkpoints directory"
            )
        return path
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return hub if hub.is_file() else None
