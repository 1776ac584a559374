"""Which concept appears in a generated image: CLIP similarity (Radford et al. 2021) between
the image and a text naming each concept, with a CLIP model the user has staged locally.

Nothing is downloaded. The model is a transformers ``CLIPModel`` folder written by
``save_pretrained`` together with its processor (``config.json``, the weights,
``preprocessor_config.json`` and the tokenizer files), e.g. ``openai/clip-vit-large-patch14``
fetched on a machine with network. It is found at ``analysis.clip`` or, when that is null, at
``$LT_DIFFUSION_CLIP``; without either the scores are left out of the record with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

CLIP_ENV = "LT_DIFFUSION_CLIP"
NOT_STAGED = (
    f"no CLIP model is staged: set analysis.clip=<folder> or ${CLIP_ENV} to a transformers "
    "CLIPModel folder saved with save_pretrained together with its processor (e.g. "
    "openai/clip-vit-large-patch14, fetched on a machine with network)"
)
# The processor's settings: preprocessor_config.json (the Hub's CLIP folders, older
# transformers) or processor_config.json (what transformers 5 writes).
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")


def staged_folder(setting: str | None, env: str, key: str, staging: str) -> Path | None:
    """The transformers model folder to use: ``setting`` (the config key ``key``), else
    ``$env``, else None. A folder that is named but unusable (no ``config.json``, processor
    config or weights) is an error here, before any long work, saying ``staging``."""
    value = setting if setting else os.environ.get(env) or None
    if value is None:
        return None
    folder = Path(value).expanduser()
    source = key if setting else f"${env}"
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / n).is_file() for n in _PROCESSOR):
        missing.append(" or ".join(_PROCESSOR))
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not folder.is_dir() or missing or not has_weights:
        what = "does not exist" if not folder.is_dir() else f"lacks {missing or ['the weights']}"
        raise FileNotFoundError(f"{source}={folder} {what}: {staging}")
    return folder


def clip_folder(setting: str | None) -> Path | None:
    """The CLIP folder to use: ``setting``, else ``$LT_DIFFUSION_CLIP``, else None."""
    return staged_folder(
        setting,
        CLIP_ENV,
        "analysis.clip",
        "it must be a transformers CLIPModel folder written by save_pretrained with its "
        "processor (config.json, model.safetensors, preprocessor_config.json, tokenizer files); "
        "set it to such a folder, or to null for no concept-presence scores",
    )


class ClipScorer:
    """Cosine similarity between CLIP image and text embeddings."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.folder = str(folder)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.folder).eval().requires_grad_(False)
        self.model.to(self.device)
        self.processor = CLIPProcessor.from_pretrained(self.folder)

    @torch.no_grad()
    def similarity(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """``(N, T)`` float64 cosine similarities of uint8 images ``(N, 3, H, W)`` with
        ``texts``, computed in the CLIP model's own preprocessing (resize, crop, normalise)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP scores uint8 RGB images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        pixels = [im.permute(1, 2, 0).cpu().numpy() for im in images]
        inputs = self.processor(text=list(texts), images=pixels, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = _embeds(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = _embeds(
            self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            )
        )
        img = torch.nn.functional.normalize(img.double(), dim=-1)
        txt = torch.nn.functional.normalize(txt.double(), dim=-1)
        return (img @ txt.T).cpu()


def _embeds(out: object) -> Tensor:
    """The projected embedding of ``get_*_features`` (a tensor, or an output object holding it
    as ``pooler_output`` in newer transformers)."""
    return out if isinstance(out, Tensor) else out.pooler_output  # type: ignore[attr-defined]
