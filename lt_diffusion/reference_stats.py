"""Write the reference statistics of a dataset as an ``.npz`` (``mu``, ``sigma`` and count of the
whole set, of each Many / Medium / Few split and of each class, with the extractor), in the format
pytorch-fid, EDM and the CBDM code read:
``python -m lt_diffusion.reference_stats dataset=cifar10_lt imbalance=ir100 out=stats/cifar10_lt.npz``.

Takes the training command's overrides for the dataset (``dataset``, ``imbalance``, ``paths``:
the class order and the splits come from the long tail) and its own settings. The file is what
``eval.reference=<file.npz>`` reads back: an evaluation then computes FID against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lt_diffusion.utils.command import config_groups, overrides_command
from lt_diffusion.utils.config import compose_config

# This command's own settings (the rest are training overrides) and their defaults.
OWN = {"out": None, "set": "reference", "features": "inception", "device": "auto",
       "batch_size": 500, "max_classes": 10}  # fmt: skip
_GROUPS = ("dataset", "imbalance", "paths")


def parse(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``(own settings, training overrides)`` of ``key=value`` arguments."""
    own: dict[str, Any] = dict(OWN)
    rest = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in OWN:
            own[key] = int(value) if isinstance(OWN[key], int) else value
        else:
            rest.append(arg)
    if not own["out"]:
        raise SystemExit(
            "reference_stats needs out=<file.npz>: where to write the statistics; see "
            "python -m lt_diffusion.reference_stats --help"
        )
    return own, rest


def run(args: Sequence[str]) -> Path:
    # Imported here: Lightning and torch-fidelity take seconds to import, --help should not wait.
    from lt_diffusion.evaluation.dataset_stats import dataset_statistics
    from lt_diffusion.runs.build import build_datamodule
    from lt_diffusion.runtime import resolve_device

    own, overrides = parse(args)
    cfg = compose_config("train", overrides)
    datamodule = build_datamodule(cfg, on_device=False)
    datamodule.setup("fit")
    path, parts = dataset_statistics(
        datamodule,
        own["out"],
        which=own["set"],
        space=own["features"],
        device=resolve_device(own["device"]),
        batch_size=own["batch_size"],
        max_classes=own["max_classes"],
        cache_dir=cfg.paths.cache_dir,
    )
    dim = len(parts["overall"].mu)
    counts = ", ".join(f"{p} {s.n}" for p, s in parts.items())
    print(f"Statistics ({own['features']}, {dim}-d) of {len(parts)} parts: {counts}")
    small = [p for p, s in parts.items() if s.n < dim]
    if small:
        print(f"Parts with fewer images than dimensions (FID against them is biased): {small}")
    print(f"Written: {path}")
    return path


def help_text() -> str:
    groups = config_groups(_GROUPS)
    return (
        f"python -m lt_diffusion.reference_stats (ltd-reference-stats): {__doc__}\n"
        "Main options:\n"
        "  out=<file.npz>  (required)\n"
        "  set=reference | train   the evaluation's reference set (default), or the long-tailed\n"
        "                          training images\n"
        "  features=inception | dinov2 | vgg16 | clip   the feature space (default inception)\n"
        "  device=auto  batch_size=500  max_classes=10 (per-class parts up to this many classes)\n"
        "  dataset=<name>  imbalance=<ir100 | ...>  paths.data_root=<dir>\n"
        "Example:\n"
        "  python -m lt_diffusion.reference_stats dataset=cifar10_lt imbalance=ir100 "
        "out=stats/cifar10_lt.npz\n"
        "  python -m lt_diffusion.evaluate checkpoint=<run>/checkpoints/last.ckpt eval=cm_paper \\\n"
        "      eval.reference=stats/cifar10_lt.npz eval.metrics=[fid,is]\n\n"
        f"== Config groups (choose one option with group=option) ==\n{groups}\n"
    )


main = overrides_command("reference_stats", help_text, run)

if __name__ == "__main__":
    main()
