"""Moved (see the README's breaking changes); this path works for one release, with a warning."""

from lt_diffusion.utils.lazy import moved

__getattr__ = moved(__name__, ("lt_diffusion.models.ema",))
