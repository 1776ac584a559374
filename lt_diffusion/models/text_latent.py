"""Text-conditioned latent diffusion from scratch (the CM paper, Table G.11, Sec. G.9): a
diffusers ``UNet2DConditionModel`` on the latents of a frozen KL autoencoder, cross-attending to
CLIP text embeddings of the images' captions.

The CM paper follows VQ-Diffusion-S (Gu et al., CVPR 2022), a VQ-VAE with a discrete-diffusion
transformer. This project's latent path is a continuous KL-latent U-Net instead (docs/latent.md):
the same autoencoder, noise schedules, samplers and latent cache as the other latent rows, and
U-Net layers for CM's low-rank capacity reservation (``unet.up_blocks``, as with ``ldm_kl8``).
What carries over from VQ-Diffusion is the conditioning: CLIP's text transformer
(``last_hidden_state`` of the caption padded to ``max_length`` tokens, 77 for CLIP).

**Captions, once.** The text encoder runs once over every distinct training caption and the
embeddings are cached on disk (:func:`caption_embeddings`), keyed by a digest of the encoder's
weights and tokenizer, the token length and the captions themselves; training and sampling read
that table. The encoder is loaded from a user-staged local folder (``model.text_encoder.
pretrained``; nothing is downloaded) or, for tests and smoke runs, built from
``model.text_encoder.config`` with random weights and a byte-level tokenizer.

**Conditioning.** Labels stay class labels ``(B,)`` everywhere (objectives, splits, per-class
evaluation); the caption of each sample is bound around the calls that need one
(:meth:`TextLatentUNet.bound_captions`): at training the caption the data stream drew for the
image, at sampling one drawn uniformly among the training captions of the label's class from the
chunk's seeded generator (:meth:`TextLatentUNet.sampling_captions`, used by
:func:`lt_diffusion.diffusion.generate`). A row of a forward whose label is the class of the
bound caption of its sample (row ``i`` of a batch of ``k B`` rows is sample ``i mod B``: CFG and
CBDM concatenate batches) takes that caption; the null label takes the empty caption's embedding
(classifier-free guidance); any other class (CBDM's balanced label ``y'``, or a call with nothing
bound) takes a caption of that class drawn at random.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lt_diffusion.models.latent import LatentBackbone
from lt_diffusion.models.latent_cache import module_digest
from lt_diffusion.utils.cache import default_cache_dir
from lt_diffusion.utils.io import atomic_torch_save

# Bump when what the caption cache stores changes: old files then miss.
CAPTION_CACHE_FORMAT = 1
EXTRA_STATE_FORMAT = 1
CLIP_FILES = "config.json, model.safetensors (or pytorch_model.bin), vocab.json and merges.txt"
# Byte-level tokenizer of the randomly initialised encoder: ids 0 / 1 are start / end (and
# padding), byte b is id b + 2.
BYTE_BOS, BYTE_EOS, BYTE_OFFSET = 0, 1, 2


class TextEncoderNotStagedError(FileNotFoundError):
    """The pretrained text encoder folder the config names is not on this machine."""


class TextEncoder:
    """A frozen CLIP text transformer and its tokenizer, on the CPU until :meth:`encode` is
    asked for another device. Not an ``nn.Module``: it is no part of the backbone's state."""

    def __init__(self, model: Any, tokenize: Any, max_length: int, identity: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize  # list[str] -> int64 (N, max_length)
        self.max_length = int(max_length)
        self.dim = int(model.config.hidden_size)
        self.calls = 0  # encoder passes run (tests count them)
        self._identity = identity
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """What the embeddings depend on: the weights, the tokenizer and the token length."""
        if self._digest is None:
            text = f"{module_digest(self.model)}|{self._identity}|{self.max_length}"
            self._digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        return self._digest

    @torch.no_grad()
    def encode(
        self, captions: Sequence[str], device: torch.device | str = "cpu", batch_size: int = 256
    ) -> Tensor:
        """``last_hidden_state`` ``(N, max_length, D)`` of the padded captions, float32 on the
        CPU (as Stable Diffusion's and VQ-Diffusion's pipelines condition)."""
        self.model.to(device)
        out = []
        for start in range(0, len(captions), batch_size):
            ids = self.tokenize(list(captions[start : start + batch_size])).to(device)
            out.append(self.model(input_ids=ids).last_hidden_state.float().cpu())
            self.calls += 1
        self.model.to("cpu")
        if not out:
            return torch.zeros(0, self.max_length, self.dim)
        return torch.cat(out)


def byte_tokenize(captions: Sequence[str], max_length: int) -> Tensor:
    """Start id, the caption's UTF-8 bytes (each ``b + 2``), end id, padded with the end id
    and truncated to ``max_length``: the tokenizer of a randomly initialised encoder."""
    ids = torch.full((len(captions), max_length), BYTE_EOS, dtype=torch.long)
    for i, text in enumerate(captions):
        body = [BYTE_BOS, *(b + BYTE_OFFSET for b in text.encode("utf-8"))][: max_length - 1]
        ids[i, : len(body) + 1] = torch.tensor([*body, BYTE_EOS])
    return ids


def clip_tokenize(tokenizer: Any, captions: Sequence[str], max_length: int) -> Tensor:
    """CLIP BPE ids of ``captions`` padded (and truncated) to ``max_length``, as Stable
    Diffusion's and VQ-Diffusion's pipelines tokenize."""
    return tokenizer(
        list(captions), padding="max_length", max_length=max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def load_text_encoder(
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_length: int = 77,
) -> TextEncoder:
    """A CLIP text encoder from the local folder ``pretrained`` (a download of e.g.
    ``openai/clip-vit-base-patch32``: :data:`CLIP_FILES`; nothing is downloaded) or, for tests
    and smoke runs, a ``CLIPTextModel`` built from ``config`` (``CLIPTextConfig`` arguments) with
    weights drawn from ``seed`` and the byte-level tokenizer. Exactly one of the two."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if (pretrained is None) == (config is None):
        raise ValueError(
            "model.text_encoder needs exactly one of `pretrained` (a local CLIP folder) and "
            "`config` (CLIPTextConfig arguments, for a randomly initialised encoder)"
        )
    if int(max_length) < 2:
        raise ValueError(f"model.text_encoder.max_length must be >= 2, got {max_length}")
    if config is not None:
        args = {"bos_token_id": BYTE_BOS, "eos_token_id": BYTE_EOS, "pad_token_id": BYTE_EOS}
        cfg = CLIPTextConfig(**{**args, **dict(config)})
        if cfg.vocab_size < 256 + BYTE_OFFSET or cfg.max_position_embeddings < int(max_length):
            raise ValueError(
                f"model.text_encoder.config needs vocab_size >= {256 + BYTE_OFFSET} (byte "
                f"tokens) and max_position_embeddings >= max_length ({max_length})"
            )
        with torch.random.fork_rng(devices=[]):  # deterministic weights, global RNG untouched
            torch.manual_seed(int(seed))
            model = CLIPTextModel(cfg)
        n = int(max_length)
        return TextEncoder(model, functools.partial(byte_tokenize, max_length=n), n, "bytes-v1")
    folder = Path(pretrained).expanduser()
    has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not ((folder / "config.json").is_file() and has_weights and has_bpe):
        raise TextEncoderNotStagedError(
            f"no CLIP text encoder at {folder}: model.text_encoder.pretrained must be a local "
            f"folder holding {CLIP_FILES}, e.g. `huggingface-cli download "
            "openai/clip-vit-base-patch32 --local-dir <folder>` on a machine with network, then "
            "set model.text_encoder.pretrained=<folder> (or $LT_DIFFUSION_PRETRAINED/"
            "clip-vit-base-patch32). Nothing is downloaded here."
        )
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    model = CLIPTextModel.from_pretrained(str(folder))
    n = min(int(max_length), int(tokenizer.model_max_length))
    tokenize = functools.partial(clip_tokenize, tokenizer, max_length=n)
    vocab = hashlib.sha256(
        (folder / "vocab.json").read_bytes() + (folder / "merges.txt").read_bytes()
    )
    return TextEncoder(model, tokenize, n, f"clip-bpe-{vocab.hexdigest()[:16]}")


def resolve_caption_cache_dir(value: str | None) -> str | None:
    """``"auto"``: ``$LT_DIFFUSION_CACHE/captions`` (else ``~/.cache/lt_diffusion/captions``);
    None: no disk cache; anything else: that folder."""
    if value == "auto":
        return str(default_cache_dir() / "captions")
    return None if value is None else str(Path(value).expanduser())


class StaleCaptionCacheWarning(UserWarning):
    """A caption cache file was ignored (unreadable or not matching its key) and recomputed."""


def caption_cache_key(encoder: TextEncoder, unique: Sequence[str]) -> dict[str, Any]:
    """Everything the cached embeddings depend on (JSON-serialisable)."""
    h = hashlib.sha256()
    for text in unique:
        h.update(text.encode("utf-8") + b"\0")
    return {
        "format": CAPTION_CACHE_FORMAT,
        "encoder": encoder.digest,
        "captions": h.hexdigest(),
        "n": len(unique),
    }


def caption_embeddings(
    encoder: TextEncoder,
    captions: Sequence[str],
    cache_dir: str | Path | None,
    device: torch.device | str = "cpu",
) -> tuple[list[str], Tensor, Tensor]:
    """The distinct captions (sorted), their embeddings ``(U, L, D)`` as float16 and the index
    of each of ``captions`` among them: read from ``cache_dir`` or encoded once (and written
    atomically). A file whose key or shape disagrees is recomputed with a warning."""
    unique = sorted(set(captions))
    position = {text: i for i, text in enumerate(unique)}
    index = torch.tensor([position[text] for text in captions], dtype=torch.long)
    key = caption_cache_key(encoder, unique)
    path = None
    if cache_dir is not None:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"))
        path = Path(cache_dir) / f"captions-{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt"
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                embeds = blob["embeds"]
                shape = (len(unique), encoder.max_length, encoder.dim)
                if blob.get("key") == key and tuple(embeds.shape) == shape:
                    return unique, embeds, index
                why = "its key or shape does not match"
            except Exception as err:  # truncated or foreign file
                why = str(err)
            warnings.warn(
                f"ignoring caption cache {path}: {why}; re-encoding",
                StaleCaptionCacheWarning,
                stacklevel=2,
            )
    embeds = encoder.encode(unique, device).to(torch.float16)  # halves the table's memory
    if not torch.isfinite(embeds).all():
        raise FloatingPointError(
            "the text encoder gave non-finite embeddings: check model.text_encoder"
        )
    if path is not None:
        atomic_torch_save({"key": key, "embeds": embeds}, path)
    return unique, embeds, index


class TextLatentUNet(LatentBackbone):
    """Latent diffusion from scratch conditioned on captions: ``UNet2DConditionModel`` on the
    latents of a frozen ``AutoencoderKL``, cross-attending to CLIP text embeddings.

    Args:
        unet: ``UNet2DConditionModel`` arguments; ``sample_size``, ``in_channels``,
            ``out_channels`` and ``cross_attention_dim`` are set here.
        text_encoder: ``{pretrained, config, seed, max_length}``, see :func:`load_text_encoder`.
        caption_cache_dir: folder of the caption-embedding cache (``"auto"``:
            ``$LT_DIFFUSION_CACHE/captions``; None: encode without caching).
        backbone: ``vae``, ``image_size``, ``image_channels``, ``num_classes`` and the latent
            settings of :class:`~lt_diffusion.models.latent.LatentBackbone` (as
            :class:`~lt_diffusion.models.latent.LatentUNet` takes them).

    The captions it conditions on are the training set's (:meth:`set_captions`; the training
    module passes the datamodule's; checkpoints store their text, embedded again at first
    use). ``unet.mid_block``'s output is the bottleneck feature; CM's reservation:
    ``layers: [unet.up_blocks]``.
    """

    def __init__(
        self,
        unet: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        caption_cache_dir: str | None = None,
        **backbone: Any,
    ) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__(**backbone)
        args = dict(text_encoder)
        unknown = set(args) - {"pretrained", "config", "seed", "max_length"}
        if unknown:
            raise ValueError(
                f"model.text_encoder has unknown keys {sorted(unknown)}: use pretrained, "
                "config, seed, max_length"
            )
        self.text = load_text_encoder(**args)
        self.unet = self.build_unet(UNet2DConditionModel, unet, cross_attention_dim=self.text.dim)
        self.caption_cache_dir = resolve_caption_cache_dir(caption_cache_dir)
        self.register_buffer("null_embed", self.text.encode([""])[0], persistent=False)
        self.captions: list[str] | None = None
        self.caption_classes: list[int] | None = None
        self._tables_ready = False  # the caption tables hold self.captions' embeddings
        self._bound: Tensor | None = None
        self._empty_tables()

    # The caption tables (non-persistent buffers): filled by _fill_tables, shared by the EMA copy.
    TABLES = (
        "caption_embeds", "caption_index", "caption_class", "class_rows", "class_start",
        "class_count",
    )  # fmt: skip

    def _empty_tables(self) -> None:
        empty_long = torch.zeros(0, dtype=torch.long)
        tables = {
            "caption_embeds": torch.zeros(0, self.text.max_length, self.text.dim),
            "caption_index": empty_long,  # row -> distinct caption
            "caption_class": empty_long,  # row -> class
            "class_rows": empty_long,  # rows sorted by class
            "class_start": torch.zeros(self.num_classes, dtype=torch.long),
            "class_count": torch.zeros(self.num_classes, dtype=torch.long),
        }
        assert tuple(tables) == self.TABLES
        for name, value in tables.items():
            self.register_buffer(name, value, persistent=False)

    # -- captions -------------------------------------------------------------------------
    def set_captions(
        self,
        captions: Sequence[str],
        classes: Sequence[int] | Tensor,
        like: TextLatentUNet | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Condition on ``captions`` (row ``r`` the caption of class ``classes[r]``; the
        datamodule's :meth:`caption_table`): embedded through the caption cache, or taken from
        ``like`` (the EMA copy shares the live model's tables). ``device``: where to run the
        text encoder on a cache miss."""
        captions = [str(c) for c in captions]
        classes = [int(c) for c in (classes.tolist() if isinstance(classes, Tensor) else classes)]
        if len(captions) != len(classes) or not captions:
            raise ValueError(
                f"set_captions needs one class per caption, at least one: got {len(captions)} "
                f"captions and {len(classes)} classes"
            )
        bad = sorted({c for c in classes if not 0 <= c < self.num_classes})
        if bad:
            raise ValueError(f"caption classes {bad[:5]} are not classes 0..{self.num_classes - 1}")
        if like is not None:
            if like.captions != captions or like.caption_classes != classes:
                raise ValueError("set_captions(like=...) with other captions")
            like._check_captions()  # its tables are filled
            for name in self.TABLES:
                setattr(self, name, getattr(like, name))
            self._tables_ready = True
        elif captions != self.captions or classes != self.caption_classes:
            self._tables_ready = False
        self.captions, self.caption_classes = captions, classes
        if not self._tables_ready:
            self._fill_tables(device)

    def _fill_tables(self, device: torch.device | str | None = None) -> None:
        """Embed :attr:`captions` (through the cache; the encoder runs on ``device``, default
        this model's) into the tables, on this model's device."""
        assert self.captions is not None and self.caption_classes is not None
        where = self.null_embed.device
        _, embeds, index = caption_embeddings(
            self.text, self.captions, self.caption_cache_dir, device or where
        )
        cls = torch.tensor(self.caption_classes, dtype=torch.long)
        count = torch.bincount(cls, minlength=self.num_classes)
        self.caption_embeds = embeds.to(where)
        self.caption_index = index.to(where)
        self.caption_class = cls.to(where)
        self.class_rows = torch.argsort(cls, stable=True).to(where)
        self.class_start = (torch.cumsum(count, 0) - count).to(where)
        self.class_count = count.to(where)
        self._tables_ready = True

    def _check_captions(self) -> None:
        """Refuse to condition without captions; fill the tables of captions a checkpoint
        restored (deferred to here, so that they are embedded on the device the model was
        moved to, not on the CPU it was loaded on)."""
        if self.captions is None:
            raise RuntimeError(
                "the text-conditioned U-Net has no captions: call set_captions(<the "
                "datamodule's caption_table()>) (training does this from the datamodule; a "
                "checkpoint restores them)"
            )
        if not self._tables_ready:
            self._fill_tables()

    @contextmanager
    def bound_captions(self, rows: Tensor) -> Iterator[None]:
        """Within the block, sample ``i`` of the batch is conditioned on caption row
        ``rows[i]`` where its label is that caption's class (see the module docstring)."""
        self._check_captions()
        previous, self._bound = self._bound, rows.to(self.caption_class.device, torch.long)
        try:
            yield
        finally:
            self._bound = previous

    def draw_captions(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One caption row of each label's class, uniformly among that class's training
        captions (``generator``'s stream on its device)."""
        self._check_captions()
        labels = labels.to(self.class_count.device, torch.long)
        count = self.class_count[labels]
        if bool((count == 0).any()):
            missing = sorted(set(labels[count == 0].tolist()))
            raise ValueError(
                f"classes {missing[:5]} have no training caption to condition on: they are not "
                "in the training set"
            )
        return self._draw(labels, generator)

    def _draw(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:meth:`draw_captions` without the check (no host synchronisation)."""
        labels = labels.to(self.class_count.device, torch.long)
        count = self.class_count[labels]
        device = generator.device if generator is not None else labels.device
        u = torch.rand(labels.shape, generator=generator, device=device).to(labels.device)
        pick = torch.minimum((u * count).long(), count - 1).clamp_min(0)
        return self.class_rows[self.class_start[labels] + pick]

    @contextmanager
    def sampling_captions(
        self, labels: Tensor, generator: torch.Generator | None = None
    ) -> Iterator[None]:
        """Bind one caption per label, drawn from ``generator`` (:meth:`draw_captions`), for a
        whole reverse process: what :func:`lt_diffusion.diffusion.generate` wraps each chunk
        in."""
        with self.bound_captions(self.draw_captions(labels, generator)):
            yield

    def condition_rows(self, labels: Tensor) -> Tensor:
        """The caption row of every label (-1 for the null label; see the module docstring)."""
        self._check_captions()
        labels = labels.to(self.caption_class.device, torch.long)
        null = labels == self.null_label
        real = torch.where(null, torch.zeros_like(labels), labels)
        rows = self._draw(real)
        bound = self._bound
        if bound is not None and len(bound) and labels.shape[0] % len(bound) == 0:
            own = bound.repeat(labels.shape[0] // len(bound))
            rows = torch.where(self.caption_class[own] == labels, own, rows)
        return torch.where(null, torch.full_like(rows, -1), rows)

    def unet_condition(self, labels: Tensor) -> dict[str, Tensor]:
        """Cross-attention states: each label's caption embedding (see the module docstring);
        ``(B, K)`` concept rows are refused by :meth:`Backbone.forward`."""
        rows = self.condition_rows(labels)
        embeds = self.caption_embeds[self.caption_index[rows.clamp_min(0)]]
        dtype = next(self.unet.parameters()).dtype
        null = self.null_embed.to(dtype).expand_as(embeds)
        states = torch.where((rows < 0)[:, None, None], null, embeds.to(dtype))
        return {"encoder_hidden_states": states}

    # -- checkpoints: the captions' text, not their embeddings ---------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "text": {
                "format": EXTRA_STATE_FORMAT,
                "encoder": self.text.digest,
                "captions": self.captions,
                "classes": self.caption_classes,
            },
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        text = state.get("text") if isinstance(state, dict) else None
        if not isinstance(text, dict) or text.get("format") != EXTRA_STATE_FORMAT:
            raise RuntimeError(
                "the checkpoint holds no text-conditioning state of a known format: it was "
                "not written by this backbone"
            )
        if text["encoder"] != self.text.digest:
            raise RuntimeError(
                f"the checkpoint was trained with another text encoder (digest "
                f"{text['encoder']}) than model.text_encoder loads ({self.text.digest}): point "
                "it at the encoder the run was trained with"
            )
        captions, classes = text["captions"], text["classes"]
        if captions is not None and (captions, classes) != (self.captions, self.caption_classes):
            # Embedded at first use (_check_captions), on the device the model is then on.
            self.captions, self.caption_classes = list(captions), list(classes)
            self._tables_ready = False

    def __deepcopy__(self, memo: dict[int, Any]) -> TextLatentUNet:
        memo.setdefault(id(self.text), self.text)  # the frozen encoder is shared, not copied
        return super().__deepcopy__(memo)
