"""Image folders as users hand them over: PNGs of any mode are read as pixels (palette images
as their colours, 16-bit grey scaled, grey / colour converted to the dataset's channels), and
a file that cannot be used is named."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lt_diffusion.utils.imagefolder import read_image_folder, read_png, write_image_folder


def _folder(root: Path, images: list[Image.Image], names: tuple[str, ...] = ("a",)) -> Path:
    (root / "class_000").mkdir(parents=True)
    for i, im in enumerate(images):
        im.save(root / "class_000" / f"{i:06d}.png")
    (root / "meta.json").write_text(json.dumps({"class_names": list(names), "num_classes": 1}))
    return root


def _rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_palette_pngs_are_read_as_their_colours(tmp_path: Path) -> None:
    # What PNG optimisers write: an adaptive palette of 16 colours.
    rgb = Image.fromarray(_rgb(0))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    x, _, _ = read_image_folder(_folder(tmp_path / "f", [pal]), channels=3)
    want = np.asarray(pal.convert("RGB"))
    assert torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(want))
    assert int(x.max()) > 15  # not the palette indices 0..15


def test_modes_are_converted_to_the_datasets_channels(tmp_path: Path) -> None:
    grey = _rgb(1)[..., 0]
    wide = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit grey, exact 8-bit values
    assert read_png(_save(tmp_path / "w.png", wide), 1)[..., 0].tolist() == grey.tolist()
    rgba = Image.fromarray(np.dstack([_rgb(2), np.full((8, 8), 255, np.uint8)]))
    assert read_png(_save(tmp_path / "a.png", rgba), 3).tolist() == _rgb(2).tolist()
    as_rgb = read_png(_save(tmp_path / "g.png", Image.fromarray(grey)), 3)
    assert as_rgb.shape == (8, 8, 3) and (as_rgb == grey[..., None]).all()
    assert read_png(tmp_path / "g.png").shape == (8, 8, 1)  # as stored


def test_grey_images_for_an_rgb_dataset_are_converted_with_a_warning(tmp_path: Path) -> None:
    grey = [Image.fromarray(_rgb(s)[..., 0]) for s in range(2)]
    root = _folder(tmp_path / "g", [*grey, Image.fromarray(_rgb(5))])
    with pytest.warns(UserWarning, match=r"2 of 3 images in .* are greyscale, converted to RGB"):
        x, _, _ = read_image_folder(root, channels=3)
    assert (x[0] == x[0, :1]).all() and x.shape == (3, 3, 8, 8)
    with pytest.warns(UserWarning, match="1 of 3 images .* colour, converted to greyscale"):
        read_image_folder(root, channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # images as the dataset stores them: not a word
        read_image_folder(_folder(tmp_path / "c", [Image.fromarray(_rgb(6))]), channels=3)
        read_image_folder(_folder(tmp_path / "l", grey), channels=1)


def _save(path: Path, im: Image.Image) -> Path:
    im.save(path)
    return path


def test_a_bad_file_among_many_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f", [Image.fromarray(_rgb(s)) for s in range(3)])
    broken = root / "class_000" / "000001.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="000001.png cannot be read as an image"):
        read_image_folder(root, channels=3)
    Image.fromarray(_rgb(9, size=16)).save(broken)
    with pytest.raises(ValueError, match=r"000001.png is 16x16 .*000000.png is 8x8"):
        read_image_folder(root, channels=3)


def test_round_trip_of_what_sample_writes(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1])
    write_image_folder(tmp_path / "s", images, labels, ["a", "b"], {"seed": 3})
    x, y, meta = read_image_folder(tmp_path / "s", channels=1)
    assert torch.equal(x, images) and torch.equal(y, labels) and meta["seed"] == 3
