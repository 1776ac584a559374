"""Evaluation of generated images: the feature extractors (Inception offline; DINOv2, VGG-16,
CLIP when staged), features, metrics (FID, FD_DINOv2, KID, Precision/Recall, IS via
torch-fidelity), the cache of real features, statistics files, records and plots.

The public names below are imported lazily, so ``import lt_diffusion.evaluation`` stays cheap
(matplotlib and torch-fidelity load on first use).
"""

from __future__ import annotations

from lt_diffusion.utils.lazy import lazy_exports

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
    "extractors": ("SPACES", "FeatureSpace", "FeatureWeightsError"),
    "stats_file": ("StatsFileError", "read_stats", "write_stats"),
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
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
