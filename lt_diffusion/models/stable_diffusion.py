"""Stable Diffusion fine-tuned with LoRA as a class-conditional backbone (the CM paper, Table 6).

The U-Net (``UNet2DConditionModel``), text encoder (``CLIPTextModel`` + ``CLIPTokenizer``) and
autoencoder (``AutoencoderKL``) come from a local folder in the diffusers layout
(:data:`SD_LAYOUT`); nothing is downloaded. Class ``c`` is the prompt ``"a {name} painting"``
(the CM paper's template; underscores in class names become spaces), the null label of
classifier-free guidance the empty prompt. The C + 1 prompts are encoded once (the text encoder
is then released) and kept as the ``prompt_embeds`` buffer, so a training step costs the U-Net
only. Class names come from the dataset, in label order: :meth:`set_class_names` (the training
module calls it with the datamodule's names; checkpoints store them).

Multi-concept captions (the concept-dominance setting, docs/analyses.md): labels of shape
``(B, K)`` instead of ``(B,)`` are K classes per sample, conditioned on one caption that joins
their prompts (``"a baroque painting and a ukiyo e painting"``, :meth:`caption`). Such captions
are encoded when first met (the text encoder then stays loaded) and cached; ``(B,)`` labels take
the class path above unchanged.

LoRA through ``peft`` on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
the standard diffusers targets), ``B = 0`` at the start so the fine-tuned model starts exactly
at the pretrained one; everything else is frozen and left out of checkpoints (see
:mod:`.latent`). CM's LoRA form ``W = W_f + B_g A_g + B_e A_e`` is two adapters: ``general``
(rank 128, from the model config) and ``expert`` (rank 8, added by the method's model transform
:func:`add_expert_adapter`). The expert adapter is switched by
:func:`lt_diffusion.models.lowrank.set_expert_enabled` / ``theta_g_only`` like CM's reserved
capacity in the pixel U-Net (:class:`ExpertAdapterSwitch`), so CM's loss and
``evaluate theta_g_only=true`` work unchanged. :func:`merge_lora` folds the adapters into the
base weights for inference.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lt_diffusion.models.latent import LatentBackbone, is_diffusers_model_dir
from lt_diffusion.models.lowrank import LowRankMixin, replace_module

# The diffusers layout of a Stable Diffusion folder: what each subfolder must hold.
SD_LAYOUT = {
    "unet": "a diffusers UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)",
    "text_encoder": "a transformers CLIPTextModel (config.json + model.safetensors)",
    "tokenizer": "a CLIPTokenizer (vocab.json + merges.txt)",
    "vae": "a diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)",
    "scheduler": "the training noise schedule (scheduler_config.json)",
}
SCHEDULER_FILE = "scheduler_config.json"
# diffusers' beta_schedule names -> lt_diffusion's diffusion.kind.
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "squaredcos_cap_v2": "cosine",
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Multi-concept captions join their classes' prompts with this (see StableDiffusionBackbone.caption).
CAPTION_JOINER = " and "
GENERAL, EXPERT = "general", "expert"


@functools.lru_cache(maxsize=2)
def _text_parts(folder: str, encoder: bool) -> tuple[Any, Any]:
    """A Stable Diffusion folder's ``CLIPTokenizer`` and (when ``encoder``) ``CLIPTextModel`` in
    eval mode on the CPU, loaded once per process."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
    model = CLIPTextModel.from_pretrained(str(Path(folder) / "text_encoder")) if encoder else None
    return tokenizer, None if model is None else model.eval().requires_grad_(False)


def _subfolder_ok(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if name == "tokenizer":
        has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        return has_bpe or (folder / "tokenizer.json").is_file()
    if name == "scheduler":
        return (folder / SCHEDULER_FILE).is_file()
    return is_diffusers_model_dir(folder)


def check_pretrained_folder(path: str | Path) -> Path:
    """The folder, after checking that it holds every part of :data:`SD_LAYOUT`; otherwise a
    ``FileNotFoundError`` naming exactly what is missing and what is expected."""
    root = Path(path).expanduser()
    if not root.is_dir():
        missing = list(SD_LAYOUT)
    else:
        missing = [name for name in SD_LAYOUT if not _subfolder_ok(name, root / name)]
    if missing:
        expected = "\n".join(f"  {name}/: {what}" for name, what in SD_LAYOUT.items())
        where = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"Stable Diffusion folder {root} {where}. model.pretrained must be a local folder in "
            f"the diffusers layout:\n{expected}\n(e.g. a download of "
            "lambdalabs/miniSD-diffusers, the CM paper's model; nothing is downloaded here)"
        )
    return root


def check_schedule(scheduler: Mapping[str, Any], schedule: Mapping[str, Any], where: Path) -> None:
    """Refuse a diffusion config other than the one the pretrained U-Net was trained with."""
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{where} predicts {prediction!r}; lt-diffusion's objectives and samplers are "
            "epsilon-prediction: use an epsilon model (Stable Diffusion 1.x, miniSD)"
        )
    kind = BETA_SCHEDULES.get(scheduler.get("beta_schedule", "linear"))
    want = {
        "num_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "kind": kind,
        "beta_start": float(scheduler.get("beta_start", 1e-4)),
        "beta_end": float(scheduler.get("beta_end", 0.02)),
    }
    have = {k: schedule.get(k) for k in want}
    same = (
        kind is not None
        and have["kind"] == kind
        and int(have["num_timesteps"]) == want["num_timesteps"]
        and (kind == "cosine" or all(
            math.isclose(float(have[k]), want[k], rel_tol=1e-6) for k in ("beta_start", "beta_end")
        ))
    )  # fmt: skip
    if not same:
        overrides = " ".join(f"diffusion.{k}={v}" for k, v in want.items())
        raise ValueError(
            f"the pretrained U-Net was trained with the noise schedule of {where} "
            f"({scheduler.get('beta_schedule')!r}, {want}); the diffusion config has {have}. "
            f"Fine-tune with the same schedule: {overrides}"
        )


class ExpertAdapterSwitch(LowRankMixin, nn.Module):
    """CM's reserved-capacity switch for a ``peft`` adapter (no parameters of its own).

    Setting ``expert_enabled`` (what :func:`~lt_diffusion.models.lowrank.set_expert_enabled` and
    ``expert_switch`` do to every :class:`~lt_diffusion.models.lowrank.LowRankMixin`) sets the
    adapter's scale to 1 or 0 in every LoRA layer. The scale, not peft's ``set_adapter``: that
    one also flips ``requires_grad``, which must not change between the two forwards of CM's
    loss. Not mergeable by ``merge_lowrank``: use :func:`merge_lora`.
    """

    mergeable = False

    def __init__(self, adapter: str, layers: Sequence[nn.Module], rank: int) -> None:
        nn.Module.__init__(self)
        if not layers:
            raise ValueError(f"adapter {adapter!r} is in no layer of the model")
        self.adapter = adapter
        self.layers = tuple(layers)  # a plain attribute: the layers live in the U-Net
        self.expert_rank = int(rank)
        self._enabled = True

    @property
    def rank(self) -> int:
        return self.expert_rank

    @property
    def expert_enabled(self) -> bool:  # type: ignore[override]
        return self._enabled

    @expert_enabled.setter
    def expert_enabled(self, enabled: bool) -> None:
        if any(layer.merged for layer in self.layers):
            raise RuntimeError(
                "the LoRA adapters are merged into the weights: switch the expert adapter "
                "before merging"
            )
        for layer in self.layers:
            layer.set_scale(self.adapter, 1.0 if enabled else 0.0)
        self._enabled = bool(enabled)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, rank={self.expert_rank}, layers={len(self.layers)}"


class StableDiffusionBackbone(LatentBackbone):
    """Stable Diffusion's U-Net conditioned on one prompt per class, fine-tuned with LoRA.

    Args:
        pretrained: local folder in the diffusers layout (:data:`SD_LAYOUT`).
        image_size: side of the images in pixels (256 for miniSD / ArtBench-10).
        image_channels: channels of the images (3).
        num_classes: number of classes C; class C is the null label (the empty prompt).
        class_names: names in label order; None: set later with :meth:`set_class_names`.
        prompt_template: ``str.format`` template of a class prompt (the CM paper's).
        lora: ``{rank, alpha, target_modules, dropout}`` of the ``general`` adapter (alpha None
            means alpha = rank, scale 1); None fine-tunes the whole U-Net instead.
        schedule: the run's ``diffusion`` settings, checked against the folder's scheduler.
        gradient_checkpointing: trade compute for U-Net activation memory.
        decode_batch_size, latent_cache_dir: see :class:`LatentBackbone`.
    """

    concept_rows = True  # (B, K) labels: multi-concept captions (:meth:`caption`)

    def __init__(
        self,
        pretrained: str,
        image_size: int,
        num_classes: int,
        image_channels: int = 3,
        class_names: Sequence[str] | None = None,
        prompt_template: str = "a {} painting",
        lora: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        decode_batch_size: int = 16,
        latent_cache_dir: str | None = None,
    ) -> None:
        from diffusers import UNet2DConditionModel

        root = check_pretrained_folder(pretrained)
        if "{}" not in prompt_template:
            raise ValueError(
                f"prompt_template {prompt_template!r} has no '{{}}' for the class name"
            )
        if schedule is not None:
            scheduler = json.loads((root / "scheduler" / SCHEDULER_FILE).read_text())
            check_schedule(scheduler, schedule, root / "scheduler" / SCHEDULER_FILE)
        super().__init__(
            {"pretrained": str(root), "subfolder": "vae"}, image_size, image_channels,
            num_classes, decode_batch_size=decode_batch_size, latent_cache_dir=latent_cache_dir,
        )  # fmt: skip
        self.pretrained = str(root)
        self.prompt_template = prompt_template
        self.unet = UNet2DConditionModel.from_pretrained(str(root / "unet"))
        depth = len(self.unet.config.block_out_channels)
        if self.latent_size % 2 ** (depth - 1) != 0:
            raise ValueError(
                f"image_size {image_size} gives {self.latent_size}-pixel latents, not divisible "
                f"by 2^{depth - 1} (the U-Net's {depth} levels): use a multiple of "
                f"{2 ** (depth - 1) * self.image_size // self.latent_size} pixels"
            )
        if self.unet.config.in_channels != self.latent_channels:
            raise ValueError(
                f"the U-Net takes {self.unet.config.in_channels} channels, the autoencoder gives "
                f"{self.latent_channels}: the folder mixes two models"
            )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet_frozen = False
        self.adapter_names: list[str] = []
        self.adapter_ranks: dict[str, int] = {}
        self.lora_targets = tuple(LORA_TARGETS)
        self.class_names: list[str] | None = None
        self._captions: dict[tuple[int, ...], Tensor] = {}  # multi-concept caption -> embeds
        names = list(class_names) if class_names is not None else None
        if names is not None:
            self._check_names(names)
        embeds = self.encode_prompts(self.prompts(names))
        if names is None:  # class rows are filled by set_class_names
            rows = torch.zeros(self.num_classes, *embeds.shape[1:], dtype=embeds.dtype)
            embeds = torch.cat([rows, embeds])
        self.register_buffer("prompt_embeds", embeds)
        self.class_names = names
        if embeds.shape[-1] != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"the text encoder gives {embeds.shape[-1]}-d embeddings, the U-Net attends to "
                f"{self.unet.config.cross_attention_dim}: the folder mixes two models"
            )
        if lora is not None:
            lora = dict(lora)
            self.lora_targets = tuple(lora.pop("target_modules", LORA_TARGETS))
            self.add_adapter(GENERAL, **lora)
        else:
            self.unet.requires_grad_(True)

    # -- prompts ----------------------------------------------------------------------------
    def _check_names(self, names: Sequence[str]) -> None:
        if len(names) != self.num_classes:
            raise ValueError(
                f"{len(names)} class names for {self.num_classes} classes: give one name per "
                "class, in label order"
            )

    def prompts(self, names: Sequence[str] | None) -> list[str]:
        """The class prompts in label order (none when ``names`` is None), then the empty
        prompt of the null label."""
        classes = [self.prompt_template.format(n.replace("_", " ")) for n in names or []]
        return [*classes, ""]

    def tokenizer(self) -> Any:
        """The folder's ``CLIPTokenizer`` (loaded once per process)."""
        return _text_parts(self.pretrained, encoder=False)[0]

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids ``(N, L)`` of ``prompts`` padded to the tokenizer's length, exactly as
        :meth:`encode_prompts` feeds them to the text encoder."""
        tokenizer = self.tokenizer()
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], keep_encoder: bool = False) -> Tensor:
        """CLIP ``last_hidden_state`` of ``prompts`` padded to the tokenizer's length, as Stable
        Diffusion's pipeline conditions (float32, CPU). Loads the text encoder for the call;
        ``keep_encoder`` keeps it loaded for later calls (captions are encoded as they come)."""
        if keep_encoder:
            encoder = _text_parts(self.pretrained, encoder=True)[1]
        else:
            from transformers import CLIPTextModel

            encoder = CLIPTextModel.from_pretrained(str(Path(self.pretrained) / "text_encoder"))
        return encoder.eval()(self.tokenize(prompts)).last_hidden_state.float()

    def set_class_names(self, names: Sequence[str], like: StableDiffusionBackbone | None = None):
        """Encode the prompts of ``names`` (label order); ``like``: take its encoding instead
        (the EMA copy of a model that just encoded them)."""
        names = [str(n) for n in names]
        self._check_names(names)
        if like is not None:
            if like.class_names != names:
                raise ValueError("set_class_names(like=...) with other class names")
            self.prompt_embeds.copy_(like.prompt_embeds)
        elif names != self.class_names:
            embeds = self.encode_prompts(self.prompts(names))
            self.prompt_embeds.copy_(embeds.to(self.prompt_embeds.device))
        if names != self.class_names:
            self._captions = {}
        self.class_names = names

    # -- LoRA -------------------------------------------------------------------------------
    def lora_layers(self, adapter: str | None = None) -> list[nn.Module]:
        """The U-Net's peft LoRA layers (holding ``adapter`` when given)."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]
        return [m for m in layers if adapter is None or adapter in m.lora_A]

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
    ) -> None:
        """Inject a LoRA adapter (``B = 0``: the output is unchanged) into the U-Net, keep every
        adapter active, and leave only the LoRA factors trainable."""
        from peft import LoraConfig, inject_adapter_in_model

        if name in self.adapter_names:
            raise ValueError(f"the model already has a LoRA adapter named {name!r}")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        config = LoraConfig(
            r=int(rank),
            lora_alpha=float(rank if alpha is None else alpha),
            lora_dropout=float(dropout),
            target_modules=list(target_modules or self.lora_targets),
            init_lora_weights=True,  # A kaiming-uniform, B = 0
        )
        with warnings.catch_warnings():  # a second adapter is the point (CM's LoRA form)
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            inject_adapter_in_model(config, self.unet, adapter_name=name)
        self.adapter_names.append(name)
        self.adapter_ranks[name] = int(rank)
        for layer in self.lora_layers():
            layer.set_adapter(list(self.adapter_names))  # all adapters active
        for pname, p in self.unet.named_parameters():
            p.requires_grad_("lora_" in pname)
        self.unet_frozen = True
        self.invalidate_frozen_digest()

    def is_frozen_pretrained(self, name: str) -> bool:
        if super().is_frozen_pretrained(name):
            return True
        return self.unet_frozen and name.startswith("unet.") and "lora_" not in name

    # -- checkpoints ------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "class_names": self.class_names,
            "adapters": dict(self.adapter_ranks),
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        if state.get("adapters") != self.adapter_ranks:
            raise RuntimeError(
                f"the checkpoint's LoRA adapters {state.get('adapters')} differ from this "
                f"model's {self.adapter_ranks}: rebuild it with the run's model and method config"
            )
        self.class_names = state.get("class_names")
        self._captions = {}

    # -- multi-concept captions -------------------------------------------------------------
    def caption(self, concepts: Sequence[int]) -> str:
        """The caption of one multi-concept label row: its classes' prompts in order, joined by
        :data:`CAPTION_JOINER` (``"a baroque painting and a ukiyo e painting"``). Null entries
        are skipped, so a row of null labels is the empty prompt."""
        if self.class_names is None:
            raise RuntimeError("captions need the class names: call set_class_names first")
        bad = [int(c) for c in concepts if not 0 <= int(c) <= self.null_label]
        if bad:
            raise ValueError(
                f"caption concepts {bad} are not classes 0..{self.num_classes - 1} (or the null "
                f"label {self.null_label})"
            )
        names = [self.class_names[int(c)] for c in concepts if int(c) != self.null_label]
        return CAPTION_JOINER.join(self.prompts(names)[:-1])

    def caption_embeds(self, rows: Tensor) -> Tensor:
        """Text embeddings ``(B, L, D)`` of multi-concept label rows ``(B, K)``. Each distinct
        caption is encoded once and cached (not saved: it follows from the class names and the
        frozen text encoder); a row of nulls takes the null label's embedding."""
        keys = [tuple(r) for r in rows.tolist()]  # one host sync per batch
        new = sorted({k for k in keys if k not in self._captions and set(k) != {self.null_label}})
        if new:
            embeds = self.encode_prompts([self.caption(k) for k in new], keep_encoder=True)
            self._captions.update(zip(new, embeds))
        null = self.prompt_embeds[self.null_label]
        out = [null if set(k) == {self.null_label} else self._captions[k] for k in keys]
        return torch.stack([e.to(device=null.device, dtype=null.dtype) for e in out])

    # -- forward ----------------------------------------------------------------------------
    def unet_condition(self, labels: Tensor) -> dict[str, Tensor]:
        """The prompts' text embeddings of ``labels`` (the null label: the empty prompt):
        ``(B,)`` class labels, or ``(B, K)`` multi-concept rows (:meth:`caption`)."""
        if self.class_names is None:
            raise RuntimeError(
                "the class prompts are not encoded: call set_class_names(<the dataset's class "
                "names in label order>) (training does this from the datamodule)"
            )
        if labels.ndim == 2:
            return {"encoder_hidden_states": self.caption_embeds(labels)}
        return {"encoder_hidden_states": self.prompt_embeds[labels]}


def add_expert_adapter(
    model: StableDiffusionBackbone,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    name: str = EXPERT,
) -> StableDiffusionBackbone:
    """CM's LoRA form (the method's model transform): add the expert adapter ``B_e A_e`` next to
    the general one, on the same layers, behind an :class:`ExpertAdapterSwitch`."""
    if not isinstance(model, StableDiffusionBackbone):
        raise TypeError(
            f"add_expert_adapter extends a StableDiffusionBackbone (model=sd_lora), got "
            f"{type(model).__name__}: for the pixel U-Net use method=cm"
        )
    general = model.adapter_ranks.get(GENERAL)
    if general is not None and int(rank) >= general:
        raise ValueError(
            f"CM's LoRA form needs r_e < r_g (the paper: 8 < 128); got expert rank {rank} and "
            f"general rank {general}"
        )
    model.add_adapter(name, rank=rank, alpha=alpha, dropout=dropout)
    model.expert_switch = ExpertAdapterSwitch(name, model.lora_layers(name), rank)
    return model


@torch.no_grad()
def merge_lora(model: StableDiffusionBackbone) -> StableDiffusionBackbone:
    """Fold every LoRA adapter, at its current scale (an expert switched off merges as zero),
    into plain U-Net layers, in place. Merge after loading a checkpoint: the state dict then
    has the plain U-Net's keys (all of them: the weights are no longer the pretrained ones)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.unet.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            replace_module(model.unet, name, module.get_base_layer())
    if hasattr(model, "expert_switch"):
        del model.expert_switch
    model.adapter_names, model.adapter_ranks = [], {}
    model.unet_frozen = False
    model.invalidate_frozen_digest()
    return model
