"""Which images an evaluation protocol compares, derived from the config and the dataset.

One generation pass serves every comparison: class ``c`` gets the largest number of images any
comparison needs from it, and each comparison takes the first ``n`` images of its classes.
Every comparison has exactly the protocol's number of generated images, spread over its
classes as evenly as the count divides (per-class counts differ by at most one), and the same
number of real images of each of its classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lt_diffusion.data.splits import SPLITS
from lt_diffusion.runs.build import sampler_label
from lt_diffusion.utils.config import CONFIG_DIR


@dataclass(frozen=True)
class ComparisonPlan:
    """Generated images of ``classes`` against real images of the same classes.

    ``generated[i]`` / ``real[i]`` are the numbers of generated / real images of
    ``classes[i]``: generated images sum to exactly the protocol's count (split as evenly as
    it divides, the first classes taking one more), real images are equally many per class
    (as balanced as the generated ones)."""

    name: str  # "overall", "many", ..., "class_003"
    kind: str  # "overall" | "split" | "class"
    classes: tuple[int, ...]
    generated: tuple[int, ...]
    real: tuple[int, ...]

    @property
    def n_generated(self) -> int:
        return sum(self.generated)

    @property
    def n_real(self) -> int:
        return sum(self.real)


def split_evenly(total: int, parts: int) -> tuple[int, ...]:
    """``total`` as ``parts`` counts that differ by at most one, larger ones first."""
    base, extra = divmod(int(total), int(parts))
    return tuple(base + (i < extra) for i in range(parts))


def comparisons(
    protocol: DictConfig,
    num_classes: int,
    splits: Sequence[str],
    real_available: Sequence[int],
) -> list[ComparisonPlan]:
    """The protocol's comparisons for a dataset with ``splits[c]`` the split of class c and
    ``real_available[c]`` real reference images of class c.

    Each comparison has exactly ``generated`` images; its real set takes the same number of
    images of every class: ``real_per_class`` (null: as many as its smallest class has), so
    a reference that is not class-balanced (CelebA-HQ: more women than men) is balanced like
    the generated images.
    """
    out: list[ComparisonPlan] = []
    all_classes = tuple(range(num_classes))

    def add(name: str, kind: str, classes: tuple[int, ...], spec: DictConfig | None) -> None:
        if spec is None or not spec.get("generated"):
            return
        total = int(spec.generated)
        if total < len(classes):
            setting = {"overall": "overall", "split": "per_split", "class": "per_class"}[kind]
            raise ValueError(
                f"eval.{setting}.generated={total} is fewer than one image per class for "
                f"'{name}' ({len(classes)} classes): raise it"
            )
        per_class = min(real_available[c] for c in classes)
        wanted = spec.get("real_per_class")
        if wanted is not None:
            per_class = min(per_class, int(wanted))
        out.append(
            ComparisonPlan(
                name, kind, classes, split_evenly(total, len(classes)), (per_class,) * len(classes)
            )
        )

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


def images_per_class(comps: Sequence[ComparisonPlan], num_classes: int) -> list[int]:
    """Generated images needed from each class to serve every comparison (each comparison
    takes the first ones of its classes)."""
    need = [0] * num_classes
    for comp in comps:
        for c, n in zip(comp.classes, comp.generated):
            need[c] = max(need[c], n)
    return need


def real_images_per_class(comps: Sequence[ComparisonPlan]) -> dict[int, int]:
    """Real images whose features each compared class needs; classes in no comparison are
    left out."""
    need: dict[int, int] = {}
    for comp in comps:
        for c, n in zip(comp.classes, comp.real):
            need[c] = max(need.get(c, 0), n)
    return dict(sorted(need.items()))


def protocol_sampler(protocol: DictConfig, config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """The sampler an evaluation generates with: the one source of truth is the protocol's
    ``sampler`` node, ``{group: <configs/sampler/ file>, <setting>: <value>, ...}``.

    The group file gives the sampler and its defaults; every other key of the node overrides the
    setting of that name (``steps``, ``clip_denoised``, ...). Returns a sampler group node
    (``{name, guidance, sampler: {_target_, ...}}``) whose ``name`` says what ran
    (``ddim20``, ``dpm_solver15``); a setting the sampler does not have is refused.
    """
    node = protocol.get("sampler")
    if not isinstance(node, DictConfig) or not node.get("group"):
        raise ValueError(
            f"eval.sampler of protocol '{protocol.get('name')}' must name a sampler group, e.g. "
            "{group: ddim, steps: 50}; set eval.sampler.group=<a configs/sampler/ file>"
        )
    group = str(node.group)
    path = Path(config_dir) / "sampler" / f"{group}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"eval.sampler.group={group!r} is not a sampler config; known: {known}")
    out = OmegaConf.load(path)
    settings = {k: v for k, v in node.items() if k != "group"}
    unknown = sorted(set(settings) - (set(out.sampler) - {"_target_", "_partial_"}))
    if unknown:
        valid = sorted(set(out.sampler) - {"_target_", "_partial_"})
        raise ValueError(
            f"eval.sampler sets {unknown}, which sampler '{group}' does not have; its settings: "
            f"{valid}"
        )
    out.sampler.merge_with(settings)
    out.group = group
    out.name = sampler_label(out)
    return out
