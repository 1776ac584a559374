"""Whether a concept appears in a generated image, asked of a visual question answering model
(BLIP, Li et al. 2022, ``BlipForQuestionAnswering``) through transformers, with a model the
user has staged locally: the judge of the IMBA paper's success rates (its "VQA" columns).

Nothing is downloaded. The model is a transformers ``BlipForQuestionAnswering`` folder written
by ``save_pretrained`` together with its ``BlipProcessor`` (``config.json``, the weights and the
processor / tokenizer files), e.g. ``Salesforce/blip-vqa-base`` fetched on a machine with
network. It is found at ``analysis.vqa`` or, when that is null, at ``$LT_DIFFUSION_VQA``.
The concept is present when the answer to ``question`` (``"is there a {} in the image?"``)
starts with ``yes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lt_diffusion.analysis.clip_score import staged_folder

VQA_ENV = "LT_DIFFUSION_VQA"
STAGING = (
    f"set analysis.vqa=<folder> or ${VQA_ENV} to a transformers BlipForQuestionAnswering folder "
    "saved with save_pretrained together with its BlipProcessor (e.g. Salesforce/blip-vqa-base, "
    "fetched on a machine with network: BlipForQuestionAnswering.from_pretrained(name)"
    ".save_pretrained(dir) and BlipProcessor.from_pretrained(name).save_pretrained(dir))"
)
NOT_STAGED = f"no VQA model is staged: {STAGING}"
QUESTION = "is there a {} in the image?"


def vqa_folder(setting: str | None) -> Path | None:
    """The VQA folder to use: ``setting``, else ``$LT_DIFFUSION_VQA``, else None."""
    return staged_folder(setting, VQA_ENV, "analysis.vqa", STAGING)


class VqaScorer:
    """Yes / no answers of a staged BLIP VQA model about concepts in images."""

    def __init__(
        self, folder: str | Path, device: torch.device | str = "cpu", max_new_tokens: int = 3
    ) -> None:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.folder = str(folder)
        self.device = torch.device(device)
        self.model = BlipForQuestionAnswering.from_pretrained(self.folder).eval()
        self.model.requires_grad_(False).to(self.device)
        self.processor = BlipProcessor.from_pretrained(self.folder)
        self.max_new_tokens = int(max_new_tokens)

    @torch.no_grad()
    def answers(self, images: Tensor, questions: Sequence[str]) -> list[str]:
        """The model's answer (greedy decoding, lower case) to ``questions[i]`` about the uint8
        image ``images[i]`` ``(N, 3, H, W)``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VQA reads uint8 RGB images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        pixels = [im.permute(1, 2, 0).cpu().numpy() for im in images]
        inputs = self.processor(images=pixels, text=list(questions), return_tensors="pt",
                                padding=True).to(self.device)  # fmt: skip
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [
            a.strip().lower() for a in self.processor.batch_decode(out, skip_special_tokens=True)
        ]

    def present(
        self, images: Tensor, concepts: Sequence[str], question: str = QUESTION
    ) -> tuple[Tensor, list[list[str]]]:
        """``(N, K)`` bool: whether the answer about concept ``k`` in image ``n`` is yes; and the
        answers."""
        rows = []
        for concept in concepts:
            q = question.format(concept.replace("_", " "))
            rows.append(self.answers(images, [q] * len(images)))
        answers = [list(a) for a in zip(*rows)]
        yes = torch.tensor([[a.split()[:1] == ["yes"] for a in row] for row in answers])
        return yes.view(len(images), len(concepts)), answers
