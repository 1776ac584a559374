"""Generated images on disk: one PNG per image in one folder per class, plus ``meta.json``.

Layout (what ``python -m lt_diffusion.sample`` writes and the evaluator reads)::

    <dir>/meta.json                 {"class_names": [...], "num_classes": C, ...}
    <dir>/class_000/000000.png      uint8, class 0 is the most frequent training class
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lt_diffusion.utils.io import atomic_write_json


def class_dir(root: Path, c: int) -> Path:
    return root / f"class_{c:03d}"


def write_image_folder(
    root: str | Path,
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write uint8 images (N, C, H, W) into ``root`` as a whole: a temporary folder is filled
    and renamed at the end, so an interrupted write never looks like a finished one."""
    root = Path(root)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} exists: choose another out_dir or pass overwrite=true")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counters: dict[int, int] = {}
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for img, label in zip(arr, labels.tolist()):
        i = counters.get(label, 0)
        counters[label] = i + 1
        d = class_dir(tmp, label)
        d.mkdir(exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(d / f"{i:06d}.png")
    info = {"class_names": list(class_names), "num_classes": len(class_names), **(meta or {})}
    atomic_write_json(tmp / "meta.json", info)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def read_image_folder(root: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read a folder written by :func:`write_image_folder`: uint8 (N, C, H, W), labels, meta."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{root} is not an lt-diffusion image folder (no meta.json): expected "
            "<dir>/meta.json and <dir>/class_XXX/*.png as written by python -m lt_diffusion.sample"
        )
    meta = json.loads(meta_path.read_text())
    images, labels = [], []
    for c in range(int(meta["num_classes"])):
        for f in sorted(class_dir(root, c).glob("*.png")):
            a = np.asarray(Image.open(f))
            images.append(a[..., None] if a.ndim == 2 else a)
            labels.append(c)
    if not images:
        raise FileNotFoundError(f"no PNG images under {root}/class_XXX/")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long), meta
