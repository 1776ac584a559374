"""Every backbone meets the written contract (lt_diffusion/models/backbone.py): the attributes
and the forward signature the rest of the framework relies on, and what they mean (the null
label, the image shape, eps of the input's shape, the bottleneck feature)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from lt_diffusion.diffusion.generate import is_latent_model
from lt_diffusion.models.backbone import Backbone, LatentSpace
from tests.conftest import compose_config
from tests.fakedata import write_tiny_sd

NAMES = ["art_nouveau", "baroque", "realism"]


def _pixel_unet():
    cfg = compose_config("train", ["model=unet_tiny", "dataset=cifar10_lt"])
    from hydra.utils import instantiate

    return instantiate(cfg.model)


def _latent_unet():
    from tests.test_latent import tiny

    return tiny()


def _stable_diffusion(tmp_path: Path):
    from lt_diffusion.models import StableDiffusionBackbone

    schedule = {"num_timesteps": 1000, "kind": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    return StableDiffusionBackbone(
        str(write_tiny_sd(tmp_path / "sd")), image_size=32, num_classes=3, class_names=NAMES,
        lora={"rank": 4}, schedule=schedule,
    )  # fmt: skip


def _text_latent_unet():
    from tests.test_text_ldm import tiny

    model = tiny()
    model.set_captions(["red wings", "blue crown", "yellow petals"], [0, 1, 2])
    return model


@pytest.mark.parametrize("kind", ["pixel", "latent", "text_latent", "stable_diffusion"])
def test_every_backbone_meets_the_contract(kind: str, tmp_path: Path) -> None:
    model = {"pixel": _pixel_unet, "latent": _latent_unet, "text_latent": _text_latent_unet}.get(
        kind, lambda: _stable_diffusion(tmp_path)
    )()
    assert isinstance(model, Backbone)
    assert model.null_label == model.num_classes and isinstance(model.augment_dim, int)
    params = list(inspect.signature(model.forward).parameters)
    assert params[:5] == ["x", "t", "y", "aug_labels", "return_bottleneck"], params
    latent = kind != "pixel"
    assert isinstance(model, LatentSpace) == latent == is_latent_model(model)
    pixels = (model.in_channels, model.image_size, model.image_size)
    shape = tuple(model.latent_shape) if latent else pixels
    x = torch.randn(2, *shape)
    t, y = torch.tensor([5, 900]), torch.tensor([0, 1])
    with torch.no_grad():
        eps = model(x, t, y)
        eps_null, feature = model(x, t, None, return_bottleneck=True)
        eps_null_label = model(x, t, torch.full_like(y, model.null_label))
    assert eps.shape == x.shape and feature.ndim == 4 and feature.shape[0] == 2
    torch.testing.assert_close(eps_null, eps_null_label)  # y=None is the null label
    if latent:
        images = model.decode_latents(torch.randn(1, *model.latent_shape))
        assert images.shape == (1, model.in_channels, model.image_size, model.image_size)


def _mlp():
    from lt_diffusion.models.mlp import MLPDenoiser

    return MLPDenoiser(dim=2, num_classes=3, ch=16, ch_mult=[1], num_res_blocks=1)


@pytest.mark.parametrize("kind", ["pixel", "mlp", "latent", "text_latent", "stable_diffusion"])
def test_every_backbone_refuses_bad_conditioning_alike(kind: str, tmp_path: Path) -> None:
    """One forward (Backbone) checks the conditioning of every backbone, with the same words."""
    build = {"pixel": _pixel_unet, "mlp": _mlp, "latent": _latent_unet,
             "text_latent": _text_latent_unet}  # fmt: skip
    model = build.get(kind, lambda: _stable_diffusion(tmp_path))()
    if kind == "pixel":
        shape = (model.in_channels, model.image_size, model.image_size)
    else:
        shape = tuple(model.latent_shape) if kind != "mlp" else (2,)
    x, t, y = torch.randn(2, *shape), torch.tensor([5, 900]), torch.tensor([0, 1])
    with torch.no_grad():
        scalar_t = model(x, torch.tensor(5), y)  # one shared timestep broadcasts
        torch.testing.assert_close(scalar_t, model(x, torch.tensor([5, 5]), y))
        with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
            model(x, t[:1], y)
        with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
            model(x, t, y[:1])
        with pytest.raises(ValueError, match=r"augment_dim=0: set model.augment_dim"):
            model(x, t, y, aug_labels=torch.zeros(2, 9))
        rows = torch.tensor([[0, 1], [1, 2]])
        if kind == "stable_diffusion":  # multi-concept caption rows are its labels too
            model.set_class_names(NAMES)
            assert model(x, t, rows).shape == x.shape
        else:
            with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
                model(x, t, rows)
