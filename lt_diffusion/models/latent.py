"""Latent diffusion backbones: a frozen KL autoencoder and a denoiser on its scaled latents.

A latent backbone keeps the pixel U-Net's interface, so objectives, samplers and the evaluator
work unchanged: ``forward(z_t, t, y)`` predicts the noise of *latents*, ``null_label`` is the
classifier-free-guidance class, ``num_classes`` the real classes, and ``in_channels`` /
``image_size`` describe the *images* it generates (what callers pass to
:func:`lt_diffusion.diffusion.generate` as ``image_shape``). The latent-specific hooks:

* ``latent_shape``: ``(C_z, h, w)`` of the diffusion state; ``generate`` draws its noise there
  and turns the sampled latents into images with :meth:`LatentBackbone.decode_latents`.
* :meth:`LatentBackbone.encode_moments`: the autoencoder posterior ``(mean, std)`` of images in
  ``[-1, 1]``, unscaled: what the training-set cache (:mod:`.latent_cache`) stores, once.
* :meth:`LatentBackbone.latents_from_moments`: one posterior draw, scaled as the diffusion sees
  it: ``z = (sample - shift_factor) * scaling_factor`` (Rombach et al.'s unit-variance scaling;
  0.18215 for Stable Diffusion's autoencoder, read from the autoencoder's config by default).

Frozen pretrained weights (an autoencoder loaded from a folder; in the Stable Diffusion backbone
also the LoRA-frozen U-Net) are left out of ``state_dict()``, so a checkpoint holds what
training changes, and the EMA copy shares them. Loading puts them back from the pretrained
folder the config names, after checking that a digest of those weights, stored in the
checkpoint, matches: a checkpoint never silently runs on top of other pretrained weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.models.backbone import Backbone
from lt_diffusion.models.latent_cache import tensor_digest
from lt_diffusion.utils.cache import default_cache_dir

# Files a diffusers model folder holds (weights in one of these forms).
CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Version of what get_extra_state() stores.
EXTRA_STATE_FORMAT = 1


def resolve_cache_dir(value: str | None) -> str | None:
    """``"auto"``: ``$LT_DIFFUSION_CACHE/latents``, else ``~/.cache/lt_diffusion/latents``
    (kept out of the model config, whose resolved value checkpoints compare on resume);
    None: no disk cache; anything else: that folder."""
    if value != "auto":
        return None if value is None else str(Path(value).expanduser())
    return str(default_cache_dir() / "latents")


def is_diffusers_model_dir(path: Path) -> bool:
    """A folder with ``config.json`` and a weights file (single or sharded)."""
    return (path / CONFIG_FILE).is_file() and any(
        p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in path.iterdir()
    )


def load_autoencoder(
    pretrained: str | None = None,
    subfolder: str | None = None,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Any:
    """A diffusers ``AutoencoderKL``: ``from_pretrained(pretrained[/subfolder])`` or, for tests and
    smoke runs, built from ``config`` (its constructor's arguments) with weights drawn from
    ``seed``. Exactly one of ``pretrained`` and ``config``."""
    from diffusers import AutoencoderKL

    if (pretrained is None) == (config is None):
        raise ValueError(
            "model.vae needs exactly one of `pretrained` (a local diffusers AutoencoderKL folder) "
            "and `config` (AutoencoderKL arguments, for a randomly initialised autoencoder)"
        )
    if config is not None:
        with torch.random.fork_rng(devices=[]):  # deterministic weights, global RNG untouched
            torch.manual_seed(int(seed))
            return AutoencoderKL(**dict(config))
    folder = Path(pretrained).expanduser() / (subfolder or "")
    if not folder.is_dir() or not is_diffusers_model_dir(folder):
        raise FileNotFoundError(
            f"no autoencoder at {folder}: expected a diffusers AutoencoderKL folder "
            f"({CONFIG_FILE} and diffusion_pytorch_model.safetensors), e.g. the vae/ folder of a "
            "Stable Diffusion download. Set model.vae.pretrained to it (this machine must hold "
            "the files: nothing is downloaded)."
        )
    return AutoencoderKL.from_pretrained(str(folder))


def autoencoder_from(vae: Mapping[str, Any]) -> tuple[Any, bool]:
    """The autoencoder ``model.vae`` describes (:func:`load_autoencoder`) and whether it is a
    pretrained one (kept out of checkpoints)."""
    vae_args = dict(vae)
    unknown = set(vae_args) - {"pretrained", "subfolder", "config", "seed"}
    if unknown:
        raise ValueError(
            f"model.vae has unknown keys {sorted(unknown)}: use pretrained, subfolder, config, seed"
        )
    return load_autoencoder(**vae_args), vae_args.get("pretrained") is not None


def state_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of what ``state_dict()`` holds (parameters and persistent buffers),
    read from the module tree, without running state-dict hooks."""
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in m._parameters.items():
            if p is not None:
                yield dot + name, p
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                yield dot + name, b


def _drop_frozen(module: LatentBackbone, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: frozen pretrained tensors are not saved."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if module.is_frozen_pretrained(key[len(prefix) :]):
            del state_dict[key]


def _refill_frozen(module: LatentBackbone, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: the frozen pretrained tensors a checkpoint left out are taken
    from this module (loaded from the pretrained folder), so strict loading passes."""
    for name, tensor in module.frozen_pretrained_tensors():
        state_dict.setdefault(prefix + name, tensor)


class LatentBackbone(Backbone):
    """Shared part of the latent backbones: the frozen autoencoder and the latent interface.

    Args:
        vae: ``model.vae``: ``{pretrained, subfolder, config, seed}`` of the diffusers
            ``AutoencoderKL`` (:func:`load_autoencoder`; frozen here). A pretrained one is
            rebuilt from its folder, not stored in checkpoints.
        image_size: side of the generated (and training) images in pixels.
        image_channels: channels of the images (3).
        num_classes: number of real classes C; class C is the null label.
        scaling_factor: latent scale; None reads ``vae.config.scaling_factor``.
        shift_factor: latent shift; None reads ``vae.config.shift_factor`` (0 when absent).
        decode_batch_size: latents per decoder call (bounds memory at high resolution).
        latent_cache_dir: folder of the encoded-training-set cache; ``"auto"``: below the
            project cache (:func:`resolve_cache_dir`); None: no disk cache.
    """

    def __init__(
        self,
        vae: Mapping[str, Any],
        image_size: int,
        image_channels: int,
        num_classes: int,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        decode_batch_size: int = 16,
        latent_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        vae, vae_pretrained = autoencoder_from(vae)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        cfg = vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if int(cfg.in_channels) != int(image_channels):
            raise ValueError(
                f"the autoencoder takes {cfg.in_channels}-channel images but the dataset has "
                f"{image_channels}: use an autoencoder for {image_channels}-channel images"
            )
        if int(image_size) % factor != 0:
            raise ValueError(
                f"image_size {image_size} is not divisible by the autoencoder's downsampling "
                f"factor {factor}: choose a dataset resolution that is"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.vae_pretrained = bool(vae_pretrained)
        self.image_size = int(image_size)
        self.in_channels = int(image_channels)
        self.num_classes = int(num_classes)
        self.null_label = int(num_classes)
        self.latent_channels = int(cfg.latent_channels)
        self.latent_size = self.image_size // factor
        self.scaling_factor = float(
            cfg.scaling_factor if scaling_factor is None else scaling_factor
        )
        shift = getattr(cfg, "shift_factor", None) if shift_factor is None else shift_factor
        self.shift_factor = float(shift or 0.0)
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if int(decode_batch_size) < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        self.decode_batch_size = int(decode_batch_size)
        self.latent_cache_dir = resolve_cache_dir(latent_cache_dir)
        self._frozen_digest: str | None = None
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_refill_frozen)

    # -- shapes ---------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C_z, h, w)``: the shape of the diffusion state for one image."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    # -- autoencoder ----------------------------------------------------------------------
    def encode_moments(self, images: Tensor) -> Tensor:
        """Posterior ``(mean, std)`` of images in ``[-1, 1]``, unscaled, stacked on channels:
        ``(B, 2 C_z, h, w)``."""
        with torch.no_grad():
            dist = self.vae.encode(images.to(self._vae_dtype())).latent_dist
            return torch.cat([dist.mean, dist.std], dim=1).float()

    def latents_from_moments(
        self, moments: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One posterior draw ``mean + std * noise``, scaled: the diffusion's ``x_0``."""
        mean, std = moments.float().chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images in ``[-1, 1]`` (one posterior draw each)."""
        return self.latents_from_moments(self.encode_moments(images), generator)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` (float32, clamped) from scaled latents, in chunks of
        ``decode_batch_size``."""
        out = []
        for z in latents.split(self.decode_batch_size):
            z = z.float() / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(z.to(self._vae_dtype())).sample.float().clamp(-1.0, 1.0))
        if not out:
            return latents.new_zeros((0, *self.image_shape), dtype=torch.float32)
        return torch.cat(out)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def train(self, mode: bool = True) -> LatentBackbone:
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    # -- labels and hooks -----------------------------------------------------------------
    def condition_labels(self, y: Tensor | None, x: Tensor) -> Tensor:
        """``y`` as int64 on ``x``'s device; None means the null label for the whole batch."""
        if y is None:
            return torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
        return y.to(device=x.device, dtype=torch.long)

    @contextmanager
    def capture_output(self, module: nn.Module, enabled: bool) -> Iterator[dict[str, Tensor]]:
        """Within the block, ``store["out"]`` receives ``module``'s output (CORAL's bottleneck)."""
        store: dict[str, Tensor] = {}
        if not enabled:
            yield store
            return

        def hook(_m: nn.Module, _inputs: Any, output: Any) -> None:
            store["out"] = output[0] if isinstance(output, tuple) else output

        handle = module.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def denoise(
        self, x: Tensor, t: Tensor, y: Tensor | None, aug: Tensor | None, bottleneck: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Noise prediction for latents ``x`` ``(B, C_z, h, w)`` (see
        :meth:`Backbone.forward`; no augmentation labels: ``augment_dim`` is 0); the
        bottleneck is ``unet.mid_block``'s output."""
        condition = self.unet_condition(self.condition_labels(y, x))
        with self.capture_output(self.unet.mid_block, bottleneck) as store:
            eps = self.unet(x, t, **condition).sample
        return (eps, store["out"]) if bottleneck else eps

    def build_unet(self, unet_class: type, unet: Mapping[str, Any], **condition: Any) -> Any:
        """A diffusers U-Net on the latents: ``unet_class(**unet)`` with the sample size and
        channels the autoencoder fixes and the ``condition`` arguments (class embedding or
        cross-attention width). Refuses ``model.unet`` arguments that set those, and a depth the
        latent size does not allow."""
        fixed = {"sample_size": self.latent_size, "in_channels": self.latent_channels}
        fixed.update(out_channels=self.latent_channels, **condition)
        clash = set(fixed) & set(unet)
        if clash:
            raise ValueError(
                f"model.unet sets {sorted(clash)}: these follow from the dataset and the "
                "autoencoder (and text encoder), remove them"
            )
        depth = len(unet.get("block_out_channels", (1, 1, 1, 1)))
        if self.latent_size % 2 ** (depth - 1) != 0:
            raise ValueError(
                f"latent size {self.latent_size} is not divisible by 2^{depth - 1} (the U-Net's "
                f"{depth} levels): use fewer levels or a larger image size"
            )
        return unet_class(**fixed, **dict(unet))

    def unet_condition(self, labels: Tensor) -> dict[str, Tensor]:
        """The U-Net's conditioning arguments for int64 ``labels`` (the null label included)."""
        raise NotImplementedError  # pragma: no cover - each latent backbone defines its own

    # -- checkpoints: frozen pretrained weights stay out ----------------------------------
    def is_frozen_pretrained(self, name: str) -> bool:
        """Whether the tensor ``name`` (relative to this module) is a frozen pretrained weight
        that checkpoints leave out. Subclasses add their own."""
        return self.vae_pretrained and name.startswith("vae.")

    def frozen_pretrained_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of every frozen pretrained weight, sorted by name."""
        return sorted((n, t) for n, t in state_tensors(self) if self.is_frozen_pretrained(n))

    def frozen_digest(self) -> str | None:
        """Digest of the frozen pretrained weights (None when there are none); computed once."""
        if self._frozen_digest is None:
            tensors = self.frozen_pretrained_tensors()
            self._frozen_digest = tensor_digest(tensors) if tensors else ""
        return self._frozen_digest or None

    def invalidate_frozen_digest(self) -> None:
        """Call when the set of frozen pretrained weights changes (adapters added, merged)."""
        self._frozen_digest = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT, "frozen_digest": self.frozen_digest()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != EXTRA_STATE_FORMAT:
            raise RuntimeError(
                f"latent backbone state of an unknown format ({type(state).__name__}): the "
                "checkpoint was written by another version of lt-diffusion"
            )
        saved, mine = state.get("frozen_digest"), self.frozen_digest()
        if saved != mine:
            raise RuntimeError(
                f"the checkpoint was trained on other pretrained weights (digest {saved}) than "
                f"this config loads ({mine}): point the model config at the pretrained folder "
                "the run was trained with"
            )

    def __deepcopy__(self, memo: dict[int, Any]) -> LatentBackbone:
        # Frozen weights never change: a copy (the EMA model) shares them.
        frozen = [t for _, t in self.frozen_pretrained_tensors()]
        for tensor in [*frozen, *self.vae.parameters(), *self.vae.buffers()]:
            memo.setdefault(id(tensor), tensor)
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new


class LatentUNet(LatentBackbone):
    """Class-conditional latent diffusion from scratch: diffusers' ``UNet2DModel`` on the latents
    of a frozen ``AutoencoderKL``, a class embedding (C + 1 rows, the last the null label)
    added to the timestep embedding, as the pixel U-Net does.

    Args:
        image_size, image_channels, num_classes: the images generated (dataset settings).
        vae: ``{pretrained, subfolder, config, seed}``, see :func:`load_autoencoder`.
        unet: ``UNet2DModel`` arguments (widths, block types, ...); ``sample_size``,
            ``in_channels``, ``out_channels`` and ``num_class_embeds`` are set here.
        latent: ``scaling_factor``, ``shift_factor``, ``decode_batch_size``,
            ``latent_cache_dir``: see :class:`LatentBackbone`.

    ``unet.mid_block``'s output is the bottleneck feature (``return_bottleneck=True``). CM's
    capacity reservation on the up-sampling half: ``layers: [unet.up_blocks]``.
    """

    def __init__(
        self,
        image_size: int,
        image_channels: int,
        num_classes: int,
        vae: Mapping[str, Any],
        unet: Mapping[str, Any],
        **latent: Any,
    ) -> None:
        from diffusers import UNet2DModel

        super().__init__(vae, image_size, image_channels, num_classes, **latent)
        self.unet = self.build_unet(UNet2DModel, unet, num_class_embeds=self.num_classes + 1)

    def unet_condition(self, labels: Tensor) -> dict[str, Tensor]:
        return {"class_labels": labels}  # UNet2DModel's class embedding (null row C)
