"""Training objectives, one module per method (DESIGN.md: the method is the objective).

Configs name ``lt_diffusion.methods.<module>.<Class>``, so a new method is one file, one config
and one test. ``from lt_diffusion.methods import <name>`` still finds a public name in whichever
module defines it (the interface in :mod:`.base` first).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def __getattr__(name: str) -> Any:
    if not name.startswith("_"):
        modules = sorted(m.name for m in pkgutil.iter_modules(__path__))
        for module_name in ["base", *(m for m in modules if m != "base")]:
            module = importlib.import_module(f"{__name__}.{module_name}")
            value = vars(module).get(name)
            # Defined in the package (not a library name a module imports, e.g. Tensor).
            if value is not None and getattr(value, "__module__", __name__).startswith(__name__):
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
