"""Package namespaces whose public names are imported on first use, so that importing a light
module of a package (``lt_diffusion.data.splits``) does not load its heavy ones (Lightning,
torch-fidelity, matplotlib)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``, from ``{module: (names...)}``."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(where)


def moved(old: str, new: Sequence[str]) -> Callable[[str], Any]:
    """``__getattr__`` of a module that moved: its names are found in the ``new`` modules,
    with a DeprecationWarning naming where to import them from (kept for one release)."""

    def __getattr__(name: str) -> Any:
        for module in new:
            target = importlib.import_module(module)
            if hasattr(target, name):
                warnings.warn(
                    f"{old}.{name} moved to {module}.{name}; import it from there (the old "
                    "path goes in the next release)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(target, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
