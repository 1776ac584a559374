"""Generated images on disk: one PNG per image in one folder per class, plus ``meta.json``.

Layout (what ``python -m lt_diffusion.sample`` writes and the evaluator reads)::

    <dir>/meta.json                 {"class_names": [...], "num_classes": C, ...}
    <dir>/class_000/000000.png      uint8, class 0 is the most frequent training class
"""

from __future__ import annotations

import json
import shutil
import warnings
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


def read_folder_meta(root: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a folder written by :func:`write_image_folder`."""
    meta_path = Path(root) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{root} is not an lt-diffusion image folder (no meta.json): expected "
            "<dir>/meta.json and <dir>/class_XXX/*.png as written by python -m lt_diffusion.sample"
        )
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not readable JSON ({err})") from err


def read_png(path: Path, channels: int | None = None) -> np.ndarray:
    """One image as uint8 ``(H, W, channels)``, whatever its PNG mode: palette images are
    expanded to their colours (not read as palette indices), 16-bit grey scaled to 8 bits,
    alpha dropped, grey / colour converted to ``channels`` (1 or 3; None: as stored).

    A file that cannot be decoded raises :class:`ValueError` naming it."""
    return _read_png(path, channels)[0]


def _read_png(path: Path, channels: int | None) -> tuple[np.ndarray, int]:
    """:func:`read_png`, and the number of channels the file stores (1: grey, 3: colour)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(im, dtype=np.float64)
                # 16-bit grey: 0..65535 to 0..255 (round(v / 257) is exact on 8-bit values)
                im = Image.fromarray(np.rint(wide / 257.0).clip(0, 255).astype(np.uint8), "L")
            grey = im.mode in ("1", "L", "LA") or (im.mode == "P" and _palette_is_grey(im))
            target = {1: "L", 3: "RGB"}.get(channels or 0, "L" if grey else "RGB")
            array = np.asarray(im.convert(target))
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoder errors
        raise ValueError(
            f"{path} cannot be read as an image ({type(err).__name__}: {err}): replace or remove it"
        ) from err
    return (array[..., None] if array.ndim == 2 else array), 1 if grey else 3


def _palette_is_grey(im: Image.Image) -> bool:
    colors = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return bool((colors == colors[:, :1]).all())


def read_image_folder(
    root: str | Path, channels: int | None = None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read a folder written by :func:`write_image_folder`: uint8 (N, C, H, W), labels, meta.

    Every PNG is converted by its mode (:func:`read_png`) to ``channels`` (the dataset's; None:
    as the first image is stored), with a warning when grey images are made colour or colour
    images grey (a folder of another dataset's or model's images, most likely); a file that
    cannot be read, or of another size than the others, stops the reading with its name."""
    root = Path(root)
    meta = read_folder_meta(root)
    images, labels, files, converted = [], [], [], []
    for c in range(int(meta["num_classes"])):
        for f in sorted(class_dir(root, c).glob("*.png")):
            a, stored = _read_png(f, channels)
            if channels is None:
                channels = a.shape[-1]
            if stored != a.shape[-1]:
                converted.append(f)
            if images and a.shape != images[0].shape:
                raise ValueError(
                    f"{f} is {a.shape[1]}x{a.shape[0]} with {a.shape[2]} channel(s), but "
                    f"{files[0]} is {images[0].shape[1]}x{images[0].shape[0]} with "
                    f"{images[0].shape[2]}: every image of a folder must have the same size"
                )
            images.append(a)
            labels.append(c)
            files.append(f)
    if not images:
        raise FileNotFoundError(f"no PNG images under {root}/class_XXX/")
    if converted:
        how = (
            "greyscale, converted to RGB (the grey value in all three channels)"
            if channels == 3
            else "colour, converted to greyscale (PIL's luma)"
        )
        warnings.warn(
            f"{len(converted)} of {len(images)} images in {root} (e.g. {converted[0]}) are "
            f"{how} for a {channels}-channel dataset: images of this dataset's models have "
            f"{channels} channel(s), so check that the folder holds the samples you mean to "
            "read",
            stacklevel=2,
        )
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long), meta
