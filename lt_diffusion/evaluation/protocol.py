"""Which images an evaluation protocol compares, derived from the config and the dataset.

One generation pass serves every comparison: class ``c`` gets the largest number of images any
comparison needs from it, and each comparison takes the first ``n`` images of its classes.
Generated labels are exactly class-balanced inside every comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig

from lt_diffusion.data import SPLITS


@dataclass(frozen=True)
class Comparison:
    """Generated images of ``classes`` (``per_class`` each) against their real images."""

    name: str  # "overall", "many", ..., "class_003"
    kind: str  # "overall" | "split" | "class"
    classes: tuple[int, ...]
    per_class: int  # generated images per class
    real_per_class: int | None  # None: every real image of the class


def comparisons(protocol: DictConfig, num_classes: int, splits: Sequence[str]) -> list[Comparison]:
    """The protocol's comparisons for a dataset with ``splits[c]`` the split of class c."""
    out: list[Comparison] = []
    all_classes = tuple(range(num_classes))

    def add(name: str, kind: str, classes: tuple[int, ...], spec: DictConfig | None) -> None:
        if spec is None or not spec.get("generated"):
            return
        per_class = int(spec.generated) // len(classes)
        if per_class < 1:
            raise ValueError(
                f"eval.{kind}.generated={spec.generated} is fewer than one image per class for "
                f"'{name}' ({len(classes)} classes): raise it"
            )
        real = spec.get("real_per_class")
        out.append(Comparison(name, kind, classes, per_class, None if real is None else int(real)))

    add("overall", "overall", all_classes, protocol.get("overall"))
    for split in SPLITS:
        members = tuple(c for c in all_classes if splits[c] == split)
        if members:
            add(split, "split", members, protocol.get("per_split"))
    if protocol.get("per_class") and protocol.per_class.get("generated"):
        max_classes = protocol.per_class.get("max_classes") or num_classes
        if num_classes <= max_classes:
            for c in all_classes:
                spec = DictConfig(
                    {
                        "generated": protocol.per_class.generated,
                        "real_per_class": protocol.per_class.get("real_per_class"),
                    }
                )
                add(f"class_{c:03d}", "class", (c,), spec)
    if not out:
        raise ValueError("the evaluation protocol asks for no comparison: set eval.overall etc.")
    return out


def images_per_class(comps: Sequence[Comparison], num_classes: int) -> list[int]:
    """Generated images needed from each class to serve every comparison."""
    need = [0] * num_classes
    for comp in comps:
        for c in comp.classes:
            need[c] = max(need[c], comp.per_class)
    return need


def real_images_per_class(comps: Sequence[Comparison], num_classes: int) -> dict[int, int | None]:
    """Real images whose features each compared class needs (None: all of them); classes in
    no comparison are left out."""
    need: dict[int, int | None] = {}
    for comp in comps:
        for c in comp.classes:
            n = comp.real_per_class
            if c not in need:
                need[c] = n
            elif need[c] is None or n is None:
                need[c] = None  # some comparison wants every real image of c
            else:
                need[c] = max(need[c], n)
    return dict(sorted(need.items()))
