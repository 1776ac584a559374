"""Latent diffusion from scratch: the autoencoder interface, frozen-weight checkpoints, the
encoded-training-set cache, unclamped latent sampling, and train -> checkpoint -> load ->
sample -> evaluate end to end on tiny randomly initialised components (no download)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lt_diffusion.data.datamodule import BatchStream
from lt_diffusion.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule, generate
from lt_diffusion.diffusion.generate import sample_unbounded
from lt_diffusion.models import LatentUNet, encoded_training_set
from lt_diffusion.models.latent_cache import cache_key, cache_path
from lt_diffusion.runs.checkpoint import read_checkpoint
from lt_diffusion.runs.load import load_exported, load_sampling_model
from tests.conftest import assert_same_state, compose_config, tiny_eval

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


def tiny(vae: dict | None = None, **kw) -> LatentUNet:
    return LatentUNet(32, 3, 10, vae=vae or {"config": VAE}, unet=UNET, **kw)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """A tiny AutoencoderKL saved in the diffusers format (as a pretrained one would be)."""
    folder = tmp_path_factory.mktemp("vae")
    tiny().vae.save_pretrained(folder)
    return folder


def test_latent_interface_matches_the_autoencoder() -> None:
    model = tiny(scaling_factor=0.5, shift_factor=0.1)
    assert model.latent_shape == (4, 16, 16) and model.null_label == 10
    assert (model.in_channels, model.image_size) == (3, 32)
    assert not any(p.requires_grad for p in model.vae.parameters())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    moments = model.encode_moments(x)
    dist = model.vae.encode(x).latent_dist  # independent: the autoencoder itself
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.std], 1))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    z = model.latents_from_moments(moments, generator=g)
    torch.testing.assert_close(z, (dist.mean + dist.std * noise - 0.1) * 0.5)
    images = model.decode_latents(z)
    want = model.vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1)
    torch.testing.assert_close(images, want)
    # The class embedding has C + 1 rows; labels select them (null = the last row).
    t = torch.tensor([5, 5, 5])
    a = model(z, t, torch.tensor([0, 1, 10]))
    b = model(z, t, None)
    assert not torch.allclose(a[0], a[1]) and torch.allclose(a[2], b[2])
    eps, feat = model(z, t, torch.tensor([0, 1, 2]), return_bottleneck=True)
    assert feat.shape == (3, 64, 8, 8) and eps.shape == z.shape


def test_bad_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        LatentUNet(32, 3, 10, vae={}, unet=UNET)
    with pytest.raises(FileNotFoundError, match="no autoencoder at"):
        tiny(vae={"pretrained": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="not divisible by the autoencoder"):
        LatentUNet(31, 3, 10, vae={"config": VAE}, unet=UNET)
    with pytest.raises(ValueError, match="augmentation labels"):
        model = tiny()
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1, dtype=torch.long), aug_labels=torch.ones(1))
    with pytest.raises(ValueError, match="follow from the dataset"):
        LatentUNet(32, 3, 10, vae={"config": VAE}, unet={**UNET, "in_channels": 4})


def test_pretrained_autoencoder_stays_out_of_checkpoints(vae_folder: Path) -> None:
    model = tiny(vae={"pretrained": str(vae_folder)})
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)  # "trained"
    state = model.state_dict()
    assert not any(k.startswith("vae.") for k in state) and "unet.conv_in.weight" in state
    ema = copy.deepcopy(model)  # the EMA copy shares the frozen autoencoder
    assert ema.vae.encoder.conv_in.weight is model.vae.encoder.conv_in.weight
    assert ema.unet.conv_in.weight is not model.unet.conv_in.weight

    fresh = tiny(vae={"pretrained": str(vae_folder)})
    fresh.load_state_dict(state)  # strict: the autoencoder comes back from the folder
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 900])
    torch.testing.assert_close(fresh(z, t, torch.tensor([1, 2])), model(z, t, torch.tensor([1, 2])))

    other = tiny(vae={"pretrained": str(vae_folder)})
    with torch.no_grad():
        other.vae.decoder.conv_out.bias.add_(1.0)  # other pretrained weights
    other.invalidate_frozen_digest()
    with pytest.raises(RuntimeError, match="other pretrained weights"):
        other.load_state_dict(state)


def test_latent_cache_is_written_once_and_keyed_by_data_and_weights(tmp_path: Path) -> None:
    model = tiny()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    kw = {"mirror": True, "cache_dir": tmp_path, "device": torch.device("cpu"), "batch_size": 4}
    first = encoded_training_set(model, images, labels, **kw)
    x = images.float() / 127.5 - 1
    torch.testing.assert_close(first.moments, model.encode_moments(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        first.mirrored, model.encode_moments(x.flip(3)), rtol=1e-5, atol=1e-5
    )
    path = cache_path(tmp_path, cache_key(model, images, labels, True))
    assert path.is_file() and len(list(tmp_path.iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("the cache should have been read, not recomputed")

    model.encode_moments = boom  # type: ignore[method-assign]
    again = encoded_training_set(model, images, labels, **kw)
    assert torch.equal(again.moments, first.moments) and torch.equal(again.mirrored, first.mirrored)
    del model.encode_moments
    # Another subset (labels), other autoencoder weights: other files.
    encoded_training_set(model, images, torch.tensor([0, 0, 1, 1, 2, 3]), **kw)
    with torch.no_grad():
        model.vae.encoder.conv_in.bias.add_(0.5)
    encoded_training_set(model, images, labels, **kw)
    assert len(list(tmp_path.glob("latents-*.pt"))) == 3
    with pytest.raises(FileNotFoundError, match="rank 0 wrote it"):
        encoded_training_set(model, images[:5], labels[:5], compute=False, **kw)


def test_batch_stream_serves_encoded_features_and_their_mirrors() -> None:
    # Pixel image i is [[i, 100 + i]]: its top-left value tells the index and whether it was
    # flipped. The encoded stream must serve features[i] / mirrored[i] for the same draws.
    n = 8
    pixels = torch.stack([torch.tensor([[[i, 100 + i]]]) for i in range(n)]).to(torch.uint8)
    features = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 2, 2, 2)
    mirrored = features + 1000.0
    labels = torch.arange(n) % 3
    plain = BatchStream(pixels, labels, 5, seed=1)
    encoded = BatchStream(features.contiguous(), labels, 5, seed=1, mirrored=mirrored)
    flips = 0
    for (px, py), (x, y), _ in zip(plain, encoded, range(6)):
        value = ((px[:, 0, 0, 0] + 1) * 127.5).round().long()
        flipped, index = value >= 100, value % 100
        assert torch.equal(y, py) and torch.equal(y, labels[index])
        want = torch.where(flipped[:, None, None, None], mirrored[index], features[index])
        assert torch.equal(x, want)
        flips += int(flipped.sum())
    assert 0 < flips < 30  # both branches were exercised


def _linear_eps(scale: float):
    """A toy epsilon model ``eps = scale * x`` with the backbone attributes samplers use."""

    class Toy(torch.nn.Module):
        null_label = 3

        def forward(self, x, t, y):
            return scale * x + 0.01 * y.float()[:, None, None, None]

    return Toy()


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_unbounded_sampling_equals_the_sampler_inside_and_does_not_clamp(kind: str) -> None:
    schedule = NoiseSchedule(num_timesteps=40)
    sampler = (
        DDIMSampler(schedule, steps=8, eta=0.5)
        if kind == "ddim"
        else DDPMSampler(schedule, clip_denoised=False)
    )
    labels = torch.tensor([0, 1, 2, 0])
    model = _linear_eps(0.3)
    for std in (0.05, 5.0):
        noise = std * torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
        ref = sampler.sample(model, noise, labels, 1.5, torch.Generator().manual_seed(1))
        out = sample_unbounded(sampler, model, noise, labels, 1.5, torch.Generator().manual_seed(1))
        # The same reverse process; only the samplers' final clamp to [-1, 1] differs.
        torch.testing.assert_close(out.clamp(-1, 1), ref, rtol=1e-5, atol=1e-6)
    assert out.abs().max() > 1.5  # large latents are kept, not clamped


def test_generate_decodes_latents_to_uint8_images() -> None:
    model = tiny().eval()
    sampler = DDIMSampler(NoiseSchedule(num_timesteps=20), steps=2)
    labels = torch.tensor([0, 3, 9])
    images = generate(model, sampler, labels, seed=0, batch_size=2, image_shape=(3, 32, 32))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    # Independent recomputation of chunk 0: its noise, the unclamped sampler, the decoder.
    from lt_diffusion.diffusion.generate import chunk_seed

    g = torch.Generator().manual_seed(chunk_seed(0, 0))
    noise = torch.randn((2, *model.latent_shape), generator=g)
    z = sample_unbounded(sampler, model, noise, labels[:2], 0.0, g)
    want = ((model.decode_latents(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(images[:2], want)
    with pytest.raises(ValueError, match="decodes to"):
        generate(model, sampler, labels, seed=0, batch_size=2, image_shape=(4, 16, 16))


# Tiny protocol (as tests/test_evaluate.py): a few dozen Inception passes.
PROTOCOL = tiny_eval({"eval.per_split.generated": 6, "eval.per_split.real_per_class": 3})


def test_train_checkpoint_load_sample_and_evaluate(
    train_overrides, tmp_path: Path, monkeypatch
) -> None:
    from lt_diffusion import evaluate, train

    def no_pixels(*args, **kwargs):
        raise AssertionError("training must read the encoded set, not encode pixels per step")

    monkeypatch.setattr(LatentUNet, "encode_images", no_pixels)

    cache = tmp_path / "latents"
    overrides = train_overrides(
        "model=ldm_tiny",
        f"model.latent_cache_dir={cache}",
        "train.max_steps=3",
        f"paths.run_dir={tmp_path / 'run'}",
    )
    run_dir = train.run(compose_config("train", overrides))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == 3
    files = list(cache.glob("latents-*.pt"))
    assert len(files) == 1  # encoded once, with the mirrored images (hflip)
    blob = torch.load(files[0], weights_only=True)
    assert blob["mirrored"] is not None and blob["moments"].shape[1:] == (8, 16, 16)

    model, meta = load_sampling_model(ckpt)
    assert isinstance(model, LatentUNet) and meta["global_step"] == 3
    state = read_checkpoint(ckpt)["state_dict"]
    ema = {k[len("ema_model.") :]: v for k, v in state.items() if k.startswith("ema_model.")}
    for name, tensor in model.state_dict().items():
        if name != "_extra_state":
            assert torch.equal(tensor, ema[name]), name
    assert_same_state(load_exported(run_dir / "export")[0], model)

    cfg = compose_config(
        "evaluate",
        [f"checkpoint={ckpt}", f"paths.cache_dir={tmp_path / 'cache'}", *PROTOCOL],
    )
    record = evaluate.run(cfg)
    overall = record["metrics"]["overall"]
    assert overall["n_generated"] == 10 and overall["n_real"] == 30
    assert all(torch.isfinite(torch.tensor(overall[m])) for m in ("fid", "kid"))
    assert set(record["metrics"]["per_split"]) == {"many", "medium", "few"}
