"""One-time preprocessed copies of image-file datasets, so that training never waits on JPEG
decoding.

Every image of a split is decoded once with PIL, converted to RGB, centre-cropped to a square
and resized to the configured resolution (PIL's bicubic filter, which antialiases when it
shrinks), and stored as a uint8 ``(N, S, S, 3)`` ``.npy`` next to its labels and a manifest.
The folder name carries a hash of everything the copy depends on (dataset, split, the listed
files and labels, resolution, crop and filter), so a changed setting or listing builds a new
copy and never reuses a stale one. The copy is built in a temporary folder and renamed into
place when complete (an interrupted build leaves nothing that a later load would trust); later
loads memory-map it. Processes that need the same copy at once (DDP ranks, array jobs) take a
file lock, so one builds it and the others wait and then read it.

Copies live in ``<root>/.lt_diffusion/``, next to the data, so every user and job of a shared
dataset reuses them; when the data root is read-only (a cluster's shared datasets) they go to
the cache folder (``$LT_DIFFUSION_CACHE/prepared``) instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from lt_diffusion.utils.cache import default_cache_dir
from lt_diffusion.utils.io import exclusive_lock

PREPARED_DIR = ".lt_diffusion"
RECIPE = "rgb-center-crop-bicubic-v1"


def preprocess(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``(size, size, 3)``: RGB, centre square crop, bicubic resize."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != size:
            img = img.resize((size, size), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def prepared_root(root: str | Path) -> Path:
    """Where the copies of the dataset at ``root`` live: ``root/.lt_diffusion`` when ``root``
    is writable, else a folder of the cache named after ``root``'s absolute path."""
    root = Path(root).expanduser().resolve()
    if os.access(root, os.W_OK):
        return root / PREPARED_DIR
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return default_cache_dir() / "prepared" / f"{root.name}-{tag}"


def copy_key(name: str, split: str, files: Sequence[str], labels: np.ndarray, size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{name}\n{split}\n{size}\n{RECIPE}\n".encode())
    for f in files:
        h.update(f.encode() + b"\n")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def prepared_copy(
    root: Path,
    name: str,
    split: str,
    files: Sequence[str],
    labels: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the listed ``files`` (paths relative to ``root``) at ``size``
    pixels, from the prepared copy (:func:`prepared_root`), built first if needed."""
    labels = np.asarray(labels, dtype=np.int64)
    key = copy_key(name, split, files, labels, size)
    folder = prepared_root(root) / f"{name}-{split}-{size}px-{key}"
    manifest = dict(dataset=name, split=split, size=size, recipe=RECIPE, n=len(files), key=key)
    if not (folder / "manifest.json").is_file():
        with exclusive_lock(folder.with_name(folder.name + ".lock")):
            if not (folder / "manifest.json").is_file():  # nobody built it while we waited
                _build(Path(root), folder, files, labels, size, manifest)
    return np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy")


def _build(
    root: Path,
    folder: Path,
    files: Sequence[str],
    labels: np.ndarray,
    size: int,
    manifest: dict,
) -> None:
    name, split = manifest["dataset"], manifest["split"]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(files)} images the {name} {split} listing names are "
            f"missing under {root}/ (first: {missing[0]}): the copy is incomplete; download the "
            "dataset again or fix paths.data_root"
        )
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shape = (len(files), size, size, 3)
        images = open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        desc = f"preparing {name} {split} at {size}px"
        for i, f in enumerate(tqdm(files, desc=desc, unit="img")):
            try:
                images[i] = preprocess(root / f, size)
            except (OSError, ValueError) as err:  # PIL: truncated or not an image
                raise ValueError(
                    f"{root / f} is not a readable image ({err}): replace the file (or "
                    "download the dataset again); nothing was prepared"
                ) from err
        images.flush()
        del images
        np.save(tmp / "labels.npy", labels)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
