"""Images of named concepts for the IMBA paper's experiments on the Stable Diffusion path
(``dataset=concept_images``): one folder of images per concept, ``<root>/<concept>/*.jpg``
(or .png), e.g. ``piano/`` and ``submarine/``, staged by the user from any source.

The concepts are the classes, in the order the config lists them (the head concept first).
``n_per_class`` is the scale: the head concept's image count. The pool of a concept is the first
``n_per_class`` files of its folder (sorted by name; all of them where it holds fewer), and the
imbalance profile keeps all of the head concept's and a seeded subset of ``int(n_per_class /
R)`` of the tail one's (``imbalance=step_ir100``): the paper's head / tail counts
(piano-submarine 3K / 0.03K is ``n_per_class=3000`` at 100:1, and needs 3000 piano and at least
30 submarine images; the balanced 0.15K / 0.15K is ``n_per_class=150`` with ``imbalance=ir1``).
A tail folder holding more than its count lets the seed (``imbalance.seed``) choose which.
Given the run's profile and ratio, the source refuses when it is built (before any image is
decoded or any training step) a folder with fewer images than the profile keeps of its concept,
or a ratio that leaves a concept without an image.

Images are decoded once into a prepared copy at the configured size
(:mod:`lt_diffusion.data.prepare`, centre crop, bicubic), as for the other image datasets.
The reference split (for image metrics) is the pool itself; the IMBA experiments' analysis
(``analysis=prompt_composition``) reads the training images only for their mean colour.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lt_diffusion.data.longtail import PROFILES, check_ratio, longtail_counts
from lt_diffusion.data.paper_sources import IMAGE_SUFFIXES, _ImageFileSource


class ConceptImageSource(_ImageFileSource):
    """One folder of images per concept; the concepts are the classes (listed order).

    Args:
        root: the folder holding one subfolder per concept.
        image_size: side of the prepared square images.
        concepts: the concept names (folder names; ``_`` is a space in prompts).
        n_per_class: the head concept's image count (the scale); at most this many images
            of each concept make the pool.
        profile, ratio: the run's imbalance (the dataset config passes them) for the checks.
        name: the dataset's name.
    """

    splits = ("train",)
    reference_split = "train"

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        concepts: list[str],
        n_per_class: int,
        profile: str = "native",
        ratio: float = 1.0,
        name: str = "concept_images",
    ) -> None:
        concepts = [str(c) for c in concepts]
        if len(concepts) < 2 or len(set(concepts)) != len(concepts):
            raise ValueError(
                f"dataset.concepts must name at least two distinct concepts, got {concepts}"
            )
        super().__init__(root, image_size, num_classes=len(concepts))
        self.name = str(name)
        self.class_names = concepts
        self.n_per_class = int(n_per_class)
        if self.n_per_class < 1:
            raise ValueError(f"dataset.source.n_per_class must be >= 1, got {n_per_class}")
        self.counts = self._counts(profile, ratio)
        self._files = self._pool()

    def _counts(self, profile: str, ratio: float) -> list[int]:
        """The images the profile keeps per concept; an error when one keeps none."""
        if profile not in PROFILES:
            raise ValueError(f"unknown long-tail profile {profile!r}: choose one of {PROFILES}")
        if profile == "native":
            return [self.n_per_class] * self.num_classes
        ratio = check_ratio(ratio)
        if int(self.n_per_class / ratio) < 1:  # the rarest concept's count, both profiles
            raise ValueError(
                f"imbalance ratio {ratio:g} at dataset.source.n_per_class={self.n_per_class} "
                f"leaves the concept {self.class_names[-1]!r} without an image "
                f"(int({self.n_per_class} / {ratio:g}) = 0): raise n_per_class to at least "
                f"{math.ceil(ratio)} or lower the ratio"
            )
        return longtail_counts(profile, self.n_per_class, self.num_classes, ratio)

    def _pool(self) -> list[list[str]]:
        """Per concept, the first ``n_per_class`` image files of its folder (relative paths,
        sorted names; fewer where the folder holds fewer); an error naming the folders holding
        fewer images than the profile keeps of their concept."""
        files, short = [], []
        for concept, need in zip(self.class_names, self.counts):
            folder = self.root / concept
            found = (
                sorted(f.name for f in folder.iterdir() if f.suffix in IMAGE_SUFFIXES)
                if folder.is_dir()
                else []
            )
            if len(found) < need:
                short.append(f"{folder} holds {len(found)}, needs {need}")
            files.append([f"{concept}/{f}" for f in found[: self.n_per_class]])
        if short:
            raise FileNotFoundError(
                f"too few images of a concept for this ratio and scale ({'; '.join(short)}): "
                f"stage them (.jpg or .png) in <data_root>/{self.root.name}/<concept>/, or lower "
                "dataset.source.n_per_class (the scale)"
            )
        return files

    def listing(self, split: str) -> tuple[list[str], np.ndarray]:
        labels = np.repeat(np.arange(self.num_classes), [len(f) for f in self._files])
        return [f for group in self._files for f in group], labels.astype(np.int64)
