"""Evaluation of generated images: the Inception feature extractor (offline), features,
metrics (FID, KID, Precision/Recall, IS via torch-fidelity), the cache of real statistics,
records and plots.

The public names below are imported lazily, so ``import lt_diffusion.evaluation`` stays cheap
(matplotlib and torch-fidelity load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "inception": (
        "ISUnavailableError",
        "InceptionWeightsError",
        "default_cache_dir",
        "load_extractor",
        "logits_available",
        "official_weights",
        "prepare_weights",
    ),
    "features": ("extract_features",),
    "metrics": (
        "KID",
        "METRICS",
        "Comparison",
        "Metric",
        "Statistics",
        "TooFewImagesError",
        "compare",
        "fid",
        "inception_score",
        "kid",
        "minimum_images",
        "precision_recall",
        "register",
        "statistics",
    ),
    "reference": ("cached_features", "choose_real"),
    "record": ("RecordError", "build_record", "read_record", "write_record"),
    "plots": ("plot_fid_vs_count",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
