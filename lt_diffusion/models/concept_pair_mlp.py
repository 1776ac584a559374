"""A denoiser conditioned on a concept pair (the synthetic composition dataset,
``model=concept_pair_mlp``, :mod:`lt_diffusion.data.concept_pairs`).

The MLP of :mod:`lt_diffusion.models.mlp` whose class embedding is replaced by one embedding
table per vocabulary: the conditioning of the class ``(a, b)`` is ``E_A[a] + E_B[b]``, so the
model sees the two concepts separately, as a text encoder gives a text-to-image model the words
of a two-object prompt, and composing ``(a, b)`` means using both embeddings at once. Each
table has a null row (classifier-free guidance); the null label takes both.

Which pair a class is comes from the class names (``"a<i>+b<j>"``) that the training module
gives every backbone with :meth:`ConceptPairMLP.set_class_names`, as Stable Diffusion reads its
prompts from them; the table is a buffer, so checkpoints keep it.

``tokens`` (2) says that a sample is two tokens of ``dim / 2`` coordinates: the IMBA loss
weights each token on its own (:func:`lt_diffusion.methods.imba.token_view`), and
:meth:`token_concepts` names the concept each token shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lt_diffusion.data.concept_pairs import parse_pair_name
from lt_diffusion.models.mlp import MLPDenoiser


class ConceptPairMLP(MLPDenoiser):
    """:class:`MLPDenoiser` with the conditioning ``MLP(sin(t)) + E_A[a] + E_B[b]``.

    Args:
        dim: coordinates per sample (tokens x coordinates per token).
        num_classes: concept pairs; class ``num_classes`` is the null label.
        vocab_sizes: concepts per vocabulary, ``[K_A, K_B]``; one token per vocabulary.
        class_names: the pairs' names in label order; None: set later (training does).
        **mlp: the width settings of :class:`MLPDenoiser` (``ch``, ``ch_mult``, ...).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        vocab_sizes: Sequence[int] = (2, 8),
        class_names: Sequence[str] | None = None,
        **mlp,
    ) -> None:
        super().__init__(dim, num_classes, **mlp)
        if any(k is None for k in vocab_sizes):
            raise ValueError(
                "model=concept_pair_mlp reads its vocabularies from dataset=concept_pairs "
                "(dataset.source.concepts_a / concepts_b), which this dataset lacks: use it with "
                "dataset=concept_pairs, or set model.vocab_sizes=[K_A,K_B]"
            )
        sizes = [int(k) for k in vocab_sizes]
        if len(sizes) < 1 or any(k < 1 for k in sizes) or int(dim) % len(sizes):
            raise ValueError(
                f"model.vocab_sizes must list >= 1 concept per vocabulary, one vocabulary per "
                f"token of the {dim} coordinates, got {sizes}"
            )
        temb_dim = self.label_emb.embedding_dim
        del self.label_emb  # replaced by one table per vocabulary
        self.vocab_sizes = sizes
        self.tokens = len(sizes)
        self.concept_emb = nn.ModuleList([nn.Embedding(k + 1, temb_dim) for k in sizes])
        # class -> its concept in each vocabulary; the null label's row holds the null concepts.
        self.register_buffer("pair_index", torch.tensor([sizes] * (self.num_classes + 1)))
        self.class_names: list[str] | None = None
        if class_names is not None:
            self.set_class_names(class_names)

    def set_class_names(self, names: Sequence[str], like: ConceptPairMLP | None = None) -> None:
        """Read each class's concept pair from its name (label order)."""
        names = [str(n) for n in names]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        rows = [parse_pair_name(n) for n in names]
        bad = [n for n, r in zip(names, rows) if any(k >= s for k, s in zip(r, self.vocab_sizes))]
        if bad or len(rows[0]) != self.tokens:
            raise ValueError(
                f"classes {bad} name concepts outside the model's vocabularies "
                f"{self.vocab_sizes}: set model.vocab_sizes to the dataset's [concepts_a, "
                "concepts_b]"
            )
        table = torch.tensor([*rows, self.vocab_sizes], dtype=torch.long)
        self.pair_index.copy_(table.to(self.pair_index.device))
        self.class_names = names

    def concepts(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The concept of every vocabulary for labels ``y`` (None: null), ``(B, tokens)``."""
        if y is None:
            y = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        return self.pair_index[y]

    def token_concepts(self, y: Tensor) -> Tensor:
        """The concept each token of the samples of ``y`` shows, as an index into all the
        concepts (vocabulary A's first, then B's), ``(B, tokens)``."""
        offsets = torch.tensor([0, *self.vocab_sizes[:-1]], device=y.device).cumsum(0)
        return self.pair_index[y] + offsets

    def concept_counts(self, class_counts: Sequence[float] | Tensor) -> Tensor:
        """Training samples showing each concept (vocabulary A's, then B's) from the classes'
        counts, float64."""
        counts = torch.as_tensor(class_counts, dtype=torch.float64).cpu()
        index = self.token_concepts(torch.arange(self.num_classes, device=self.pair_index.device))
        out = torch.zeros(sum(self.vocab_sizes), dtype=torch.float64)
        for v in range(self.tokens):
            out.index_add_(0, index[:, v].cpu(), counts)
        return out

    def add_labels(self, temb: Tensor, y: Tensor | None, aug: Tensor | None) -> Tensor:
        if self.class_names is None and y is not None:  # y=None (all null) needs no table
            raise RuntimeError(
                "the concept pairs of the classes are not set: call set_class_names(<the "
                "dataset's class names in label order>) (training does this from the datamodule)"
            )
        concepts = self.concepts(y, temb.shape[0], temb.device)
        for v, table in enumerate(self.concept_emb):
            temb = temb + table(concepts[:, v])
        return temb if aug is None else temb + self.aug_emb(aug.to(temb.dtype))

    def get_extra_state(self) -> dict:
        return {"class_names": self.class_names}

    def set_extra_state(self, state: dict) -> None:
        self.class_names = state.get("class_names")
