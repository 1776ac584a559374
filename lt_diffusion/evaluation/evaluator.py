"""The evaluation protocol: generate (or read) exactly class-balanced images, extract their
features in each feature space the metrics use (Inception, DINOv2, VGG-16, CLIP), compare them
with the balanced real set (or a statistics file, ``eval.reference``) overall, per split and per
class, and write one record.

Work is split across ranks (torchrun / DDP) in fixed chunks of ``eval.batch_size``: generation
and feature extraction of chunk k happen on rank ``k % world_size`` with noise seeded by k, so
the record does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lt_diffusion.diffusion import gather_order, generate
from lt_diffusion.diffusion.generate import chunk_ranges
from lt_diffusion.evaluation import extractors as X
from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.distributed import barrier, gather_objects, world
from lt_diffusion.evaluation.diversity import check_lpips_size, load_lpips, lpips_diversity
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.protocol import (
    ComparisonPlan,
    comparisons,
    images_per_class,
    real_images_per_class,
)
from lt_diffusion.evaluation.reference import cache_key, cached_features, choose_real
from lt_diffusion.evaluation.stats_file import StatsFile, StatsFileError, read_stats
from lt_diffusion.evaluation.stats_file import check_space as check_stats_space


@dataclass
class Generated:
    """Features of the generated images in each feature space, grouped by class (in generation
    order), Inception's logits when IS needs them, and the first images of each class when a
    metric needs pixels (LPIPS diversity)."""

    features: dict[str, dict[int, np.ndarray]]  # space -> class -> (n, D)
    logits: dict[int, np.ndarray] | None
    images: dict[int, Tensor] | None = None


@dataclass
class LPIPSPerClass:
    """Each class's mean pairwise LPIPS over its first ``images`` generated images."""

    values: dict[int, float]
    images: int


@dataclass
class Plan:
    """What a protocol computes, settled before any generation: its comparisons, the metrics
    computed (and the optional ones left out, with why), each metric's feature space, and the
    statistics file standing in for the real images (``eval.reference``), if any."""

    comps: list[ComparisonPlan]
    computed: list[str]
    unavailable: dict[str, str]
    spaces: dict[str, str]  # metric -> feature space
    reference: StatsFile | None = None

    @property
    def space_names(self) -> list[str]:
        """The feature spaces to extract, Inception first (IS's logits come with it)."""
        names = sorted(set(self.spaces.values()), key=lambda s: (s != "inception", s))
        return names or ["inception"]  # a protocol of pixel metrics only still counts images

    def groups(self, names: list[str], spaces: dict[str, str]) -> dict[str, list[str]]:
        """``names`` by the feature space they are computed in (``spaces``: metric -> space);
        metrics that read no features join the first space's comparison."""
        out: dict[str, list[str]] = {s: [] for s in self.space_names}
        for name in names:
            out[spaces.get(name, self.space_names[0])].append(name)
        return {s: ms for s, ms in out.items() if ms}


def prepare_lpips(
    protocol: DictConfig, dataset_info: dict[str, Any], per_class: list[int], device: torch.device
) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """Before any generation: the LPIPS network (refused when its weights are not staged), the
    number of images per class whose pairs it averages, and a check that the images are large
    enough for it. Returns ``(model, info, images per class)``."""
    asked = protocol.get("lpips_images")
    if asked is None or int(asked) < 2:
        raise ValueError(
            "lpips_diversity averages LPIPS over the pairs of the first eval.lpips_images "
            f"generated images of each class (got {asked}): set it to 2 or more, e.g. "
            "+eval.lpips_images=100"
        )
    used = min(int(asked), *per_class)
    if used < 2:
        c = int(np.argmin(per_class))
        raise M.TooFewImagesError(
            f"lpips_diversity needs at least 2 generated images of every class; class {c} gets "
            f"{per_class[c]}: raise eval.overall.generated (or eval.per_class.generated)"
        )
    model, info = load_lpips(device)
    size = protocol.get("lpips_size")
    size = None if size is None else int(size)
    check_lpips_size(model, dataset_info["channels"], dataset_info["image_size"], size)
    return model, {**info, "size": size or dataset_info["image_size"]}, used


def class_labels(per_class: list[int]) -> Tensor:
    return torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])


def _by_class(pool: np.ndarray, labels: Tensor, num_classes: int) -> dict[int, np.ndarray]:
    lab = labels.numpy()
    return {c: pool[lab == c] for c in range(num_classes)}


def _first_of_class(labels: Tensor, keep: int) -> Tensor:
    """Mask of the first ``keep`` images of each class, in label order."""
    order = torch.arange(len(labels))
    first = torch.full((int(labels.max()) + 1 if len(labels) else 0,), len(labels))
    first = first.scatter_reduce(0, labels, order, reduce="amin")
    return order - first[labels] < keep


def _extract_all(
    images: Tensor, extractors: dict[str, torch.nn.Module], bs: int, device: Any, progress: bool
) -> dict[str, dict[str, np.ndarray | None]]:
    """``{space: extract_features(...)}`` of the same images in every feature space."""
    return {
        space: extract_features(images, ext, batch_size=bs, device=device, progress=progress)
        for space, ext in extractors.items()
    }


def _logits_of(feats: dict[str, dict[str, np.ndarray | None]]) -> np.ndarray | None:
    return feats["inception"]["logits"] if "inception" in feats else None


def generated_features(
    model: torch.nn.Module,
    sampler: Any,
    per_class: list[int],
    protocol: DictConfig,
    guidance: float,
    extractors: dict[str, torch.nn.Module],
    device: torch.device,
    keep_images: int = 0,
    noise_seed: int | None = None,
) -> Generated:
    """Generate and featurise this rank's chunks in every feature space (``{space:
    extractor}``), gather, restore global order; keep the first ``keep_images`` images of each
    class. ``noise_seed``: the generation's seed (default ``protocol.seed``)."""
    rank, size = world()
    labels = class_labels(per_class)
    bs = int(protocol.batch_size)
    images = generate(
        model,
        sampler,
        labels,
        seed=int(protocol.seed) if noise_seed is None else noise_seed,
        batch_size=bs,
        image_shape=(model.in_channels, model.image_size, model.image_size),
        guidance=guidance,
        device=device,
        rank=rank,
        world_size=size,
        progress=rank == 0,
    )
    mine: dict[str, Any] = {"features": _extract_all(images, extractors, bs, device, rank == 0)}
    if keep_images:  # this rank's images among the first of their class, by global index
        ranges = chunk_ranges(len(labels), bs, rank, size)
        index = torch.cat(
            [torch.arange(a, b) for a, b in ranges] or [torch.zeros(0, dtype=torch.long)]
        )
        wanted = _first_of_class(labels, keep_images)[index]
        mine["kept"] = (index[wanted], images[wanted])
    parts = gather_objects(mine)
    n = len(labels)

    def ordered(get: Any) -> np.ndarray:
        return gather_order([torch.from_numpy(get(p)) for p in parts], n, bs).numpy()

    features = {
        space: _by_class(
            ordered(lambda p, s=space: p["features"][s]["pool"]), labels, len(per_class)
        )
        for space in extractors
    }
    logits = None
    if _logits_of(mine["features"]) is not None:
        all_logits = ordered(lambda p: _logits_of(p["features"]))
        logits = _by_class(all_logits, labels, len(per_class))
    kept = None
    if keep_images:
        index = torch.cat([p["kept"][0] for p in parts])
        pixels = torch.cat([p["kept"][1] for p in parts])[index.argsort()]
        kept = _images_by_class(pixels, labels[index.sort().values], len(per_class))
    return Generated(features, logits, kept)


def _images_by_class(images: Tensor, labels: Tensor, num_classes: int) -> dict[int, Tensor]:
    return {c: images[labels == c] for c in range(num_classes)}


def folder_features(
    images: Tensor,
    labels: Tensor,
    per_class: list[int],
    protocol: DictConfig,
    extractors: dict[str, torch.nn.Module],
    device: Any,
    keep_images: int = 0,
) -> Generated:
    """Features of a folder of generated images in every feature space: the first
    ``per_class[c]`` of each class (and the first ``keep_images`` images of each class)."""
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:n] for c, n in enumerate(per_class)])
    feats = _extract_all(images[keep], extractors, int(protocol.batch_size), device, True)
    n_classes = len(per_class)
    features = {s: _by_class(f["pool"], labels[keep], n_classes) for s, f in feats.items()}
    logits = _logits_of(feats)
    kept = None
    if keep_images:
        first = _first_of_class(labels[keep], keep_images)
        kept = _images_by_class(images[keep][first], labels[keep][first], n_classes)
    return Generated(
        features, None if logits is None else _by_class(logits, labels[keep], n_classes), kept
    )


def real_features(
    datamodule: Any,
    protocol: DictConfig,
    extractor: torch.nn.Module,
    extractor_info: dict[str, Any],
    real_per_class: dict[int, int],
    cache_dir: Path,
    device: torch.device,
    images_of: Callable[[int], Tensor] | None = None,
) -> dict[int, np.ndarray]:
    """Features of ``real_per_class[c]`` real images of each class ``c`` (a seeded choice
    among the reference images of ``c``, or among ``images_of(c)``: another set of the
    dataset's images) in one feature space, cached under a key that holds
    the extractor (its torch-fidelity name, layer and weights' SHA-256) and the SHA-256 of the
    chosen images' pixels: another data root with other pixels under the same dataset name and
    counts never reuses them (hashing costs far less than the network's passes)."""
    info = datamodule.info()
    out = {}
    for c, n in real_per_class.items():
        images = images_of(c) if images_of else datamodule.reference_set([c])[0]
        idx = choose_real(len(images), n, int(protocol.seed) + c)
        chosen = images[idx].contiguous()
        key = cache_key(
            content_sha256=hashlib.sha256(chosen.numpy().tobytes()).hexdigest(),
            dataset=info["name"],
            class_name=info["class_names"][c],
            class_index=c,
            image_size=info["image_size"],
            channels=info["channels"],
            n_available=len(images),
            n=len(idx),
            seed=int(protocol.seed) + c,
            extractor={
                "name": extractor_info.get("name"),
                "layer": extractor_info.get("layer"),
                "weights_sha256": extractor_info["weights_sha256"],
            },
        )
        out[c] = cached_features(
            key,
            lambda chosen=chosen: extract_features(
                chosen, extractor, int(protocol.batch_size), device, True
            )["pool"],
            cache_dir,
        )
    return out


def _real_of(real: dict[int, np.ndarray], c: int, n: int, seed: int) -> np.ndarray:
    """``n`` of the real features of class ``c``: all, or a seeded choice when a comparison
    needs fewer than the largest one (not the first ``n``: those follow the file order)."""
    feats = real[c]
    if n >= len(feats):
        return feats
    return feats[choose_real(len(feats), n, seed + c).numpy()]


def evaluate_comparison(
    comp: ComparisonPlan,
    gen: Generated,
    real: dict[str, dict[int, np.ndarray]],
    plan: Plan,
    protocol: DictConfig,
    is_unavailable: str | None = None,
    lpips: LPIPSPerClass | None = None,
) -> dict[str, Any]:
    """Every metric of one comparison (a record entry, through the metric registry), each in
    its feature space (``real``: space -> class -> features; empty with a statistics file),
    with the counts and settings it used. A small comparison (:func:`metrics.small_sample`)
    gets KID too, as its primary number."""
    pairs = list(zip(comp.classes, comp.generated))
    seed = int(protocol.seed)
    names = list(plan.computed)
    fid_space = plan.spaces.get("fid")
    n_real = comp.n_real
    if plan.reference is not None:
        n_real = plan.reference.parts[comp.name].n
    small = fid_space is not None and M.small_sample(
        n_real, comp.n_generated, X.SPACES[fid_space].dim
    )
    if small and "kid" not in names and plan.reference is None:
        names.append("kid")  # the unbiased number beside the biased FID, in FID's space
    spaces = {**plan.spaces, "kid": plan.spaces.get("kid", fid_space or "inception")}
    out: dict[str, Any] = {}
    notes: list[str] = []
    for space, group in plan.groups(names, spaces).items():
        fake = np.concatenate([gen.features[space][c][:n] for c, n in pairs])
        stats = None
        if plan.reference is not None:
            stats = plan.reference.parts[comp.name]
            values = np.zeros((0, fake.shape[1]))
        else:
            values = np.concatenate(
                [_real_of(real[space], c, n, seed) for c, n in zip(comp.classes, comp.real)]
            )
        logits = None
        if space == "inception" and gen.logits is not None:
            logits = np.concatenate([gen.logits[c][:n] for c, n in pairs])
        entry = M.compare(
            M.Comparison(
                real=values,
                fake=fake,
                settings=protocol,
                fake_logits=logits,
                is_unavailable=is_unavailable,
                extra={}
                if lpips is None
                else {
                    "lpips_per_class": [lpips.values[c] for c in comp.classes],
                    "lpips_images": lpips.images,
                },
                real_statistics=stats,
            ),
            group,
        )
        notes += entry.pop("notes", [])
        out.update(entry)
    out["n_real"] = n_real
    for name, why in plan.unavailable.items():
        out[name], out[f"{name}_unavailable"] = None, why
    if small:
        out["small_sample"] = True
        primary = "kid" if out.get("kid") is not None else "fid"
        out["primary"] = primary
        notes.append(
            f"small sample (fewer than {X.SPACES[fid_space].dim} images per side): FID is biased "
            "upwards at this n, "
            + (
                "KID ± std over subsets is the primary number"
                if primary == "kid"
                else "and KID cannot be computed against a statistics file"
            )
        )
    if notes:
        out["notes"] = notes
    if len(set(comp.generated)) > 1:
        out["generated_per_class"] = list(comp.generated)
    if plan.reference is None:
        out["real_per_class"] = comp.real[0] if len(set(comp.real)) == 1 else list(comp.real)
    return out


_SETTING = {"overall": "overall", "split": "per_split", "class": "per_class"}


def check_counts(
    comps: list[ComparisonPlan],
    wanted: list[str],
    protocol: DictConfig,
    generated_available: list[int] | None = None,
    real: bool = True,
) -> None:
    """Refuse, before any generation, a comparison with too few real (when ``real``: the
    dataset's, not a statistics file's) or generated images."""
    minimum = M.minimum_images(wanted, protocol)
    for comp in comps:
        setting = f"eval.{_SETTING[comp.kind]}"
        sides = [("real", comp.n_real, "real_per_class")] if real else []
        for what, n, key in [*sides, ("generated", comp.n_generated, "generated")]:
            if n < minimum:
                raise M.TooFewImagesError(
                    f"'{comp.name}' would compare only {n} {what} images; {'/'.join(wanted)} "
                    f"need at least {minimum}: raise {setting}.{key}"
                    + (" (the dataset has no more real images of these classes)"
                       if what == "real" else "")
                )  # fmt: skip
        if generated_available is not None:
            short = [c for c, n in zip(comp.classes, comp.generated) if generated_available[c] < n]
            if short:
                raise M.TooFewImagesError(
                    f"'{comp.name}' needs {max(comp.generated)} generated images per class, "
                    f"the folder has {[generated_available[c] for c in short]} for classes "
                    f"{short}: sample more (n_per_class) or lower {setting}.generated"
                )


def _check_reference(stats: StatsFile, plan: Plan) -> None:
    """A statistics file stands in for the real images only for the metrics that need nothing
    but their mean and covariance, in the file's feature space, for comparisons it holds."""
    where = f"eval.reference={stats.path}"
    from_stats = [m for m in plan.computed if M.METRICS[m].real == "statistics"]
    features = [m for m in plan.computed if M.METRICS[m].real == "features"]
    keep = [m for m in plan.computed if M.METRICS[m].real != "features"]
    if features:
        raise StatsFileError(
            f"{where}: {features} need the real images' features, which a statistics file does "
            f"not hold; compute them in an evaluation without eval.reference, or leave them out "
            f"here: eval.metrics=[{','.join(keep)}]"
        )
    if not from_stats:
        raise StatsFileError(
            f"{where}: none of eval.metrics ({plan.computed}) is a Fréchet distance"
        )
    for m in from_stats:
        space = X.SPACES[plan.spaces[m]]
        try:
            check_stats_space(stats, space.extractor, space.dim, m)
        except StatsFileError as err:
            raise StatsFileError(f"{err}; leave {m} out of eval.metrics") from None
    absent = [c.name for c in plan.comps if c.name not in stats.parts]
    if absent:
        raise StatsFileError(
            f"{where} holds statistics of {sorted(stats.parts)}, not of {absent}: switch those "
            "comparisons off (eval.per_split.generated=0 / eval.per_class.generated=0) or write "
            "a file that has them (python -m lt_diffusion.reference_stats)"
        )


def plan_protocol(
    protocol: DictConfig,
    dataset_info: dict[str, Any],
    real_available: list[int],
    generated_available: list[int] | None = None,
) -> Plan:
    """Everything checked before any generation: the comparisons and their counts, the metrics
    and their feature spaces (refused when a space's weights are not staged, unless the
    protocol lists the metric in ``optional_metrics``: then it is reported unavailable), the
    statistics file of ``eval.reference``."""
    wanted = M.check_metrics(list(protocol.metrics))
    spaces = M.feature_spaces(wanted, protocol.get("features"))
    optional = set(M.check_metrics([str(m) for m in protocol.get("optional_metrics") or []]))
    absent = X.missing(set(spaces.values()))
    unavailable = {
        m: f"not computed: {absent[spaces[m]]}"
        for m in wanted
        if m in optional and spaces.get(m) in absent
    }
    computed = [m for m in wanted if m not in unavailable]
    X.check_staged({m: spaces[m] for m in computed if m in spaces})
    comps = comparisons(
        protocol, dataset_info["num_classes"], dataset_info["splits"], real_available
    )
    reference = protocol.get("reference")
    plan = Plan(
        comps,
        computed,
        unavailable,
        {m: s for m, s in spaces.items() if m in computed},
        read_stats(reference) if reference else None,
    )
    if plan.reference is not None:
        _check_reference(plan.reference, plan)
    check_counts(comps, computed, protocol, generated_available, real=plan.reference is None)
    return plan


def dataset_reference(datamodule: Any) -> dict[str, Any]:
    """What the record states of the real images a protocol compared with by default: the
    dataset's reference split (the full training split for a long tail made by a profile)."""
    split, what = reference_split(datamodule)
    return {
        "origin": "dataset",
        "dataset": datamodule.info()["name"],
        "split": split,
        "description": f"{what}; each comparison takes the same number of real images of each "
        "of its classes (real_per_class in its entry)",
    }


def reference_split(datamodule: Any) -> tuple[str, str]:
    """``(split, what it is in words)`` of the dataset's default reference set."""
    info = datamodule.info()
    split = getattr(getattr(datamodule, "source", None), "reference_split", "train")
    native = info.get("profile") in (None, "native")
    if split == "train" and not native:
        what = (
            f"the full training split of {info['name']}, which is balanced: not the long-tailed "
            "training subset the model was trained on"
        )
    elif split == "train":
        what = f"the training split of {info['name']} (its own, native class counts)"
    else:
        what = f"the held-out {split} split of {info['name']}"
    return split, what


def run_protocol(
    *,
    protocol: DictConfig,
    dataset_info: dict[str, Any],
    datamodule: Any,
    cache_dir: Path,
    device: torch.device,
    model: torch.nn.Module | None = None,
    sampler: Any = None,
    guidance: float = 0.0,
    folder: tuple[Tensor, Tensor] | None = None,
    noise_seed: int | None = None,
) -> dict[str, Any]:
    """Run the protocol; returns ``{"metrics", "protocol", "extractors", "reference", ...}``.
    ``noise_seed`` seeds the generation (default ``protocol.seed``, which also picks the real
    images)."""
    num_classes = dataset_info["num_classes"]
    _, ref_labels = datamodule.reference_set()
    real_available = torch.bincount(ref_labels, minlength=num_classes).tolist()
    gen_available = None
    if folder is not None:
        gen_available = torch.bincount(folder[1], minlength=num_classes).tolist()
    plan = plan_protocol(protocol, dataset_info, real_available, gen_available)
    comps = plan.comps
    per_class = images_per_class(comps, num_classes)
    real_per_class = real_images_per_class(comps)

    need_is = "is" in plan.computed
    loaded = {
        space: X.load(
            space,
            device,
            **(
                {"want_logits": need_is, "require_logits": need_is and bool(protocol.require_is)}
                if space == "inception"
                else {}
            ),
        )
        for space in plan.space_names
    }
    extractors = {space: ext for space, (ext, _) in loaded.items()}
    infos = {space: info for space, (_, info) in loaded.items()}
    lpips_model, keep = None, 0
    if "lpips_diversity" in plan.computed:
        lpips_model, lpips_info, keep = prepare_lpips(protocol, dataset_info, per_class, device)
        infos["lpips"] = lpips_info
    t0 = time.time()
    if folder is not None:
        gen = folder_features(*folder, per_class, protocol, extractors, device, keep)
    else:
        gen = generated_features(
            model, sampler, per_class, protocol, guidance, extractors, device, keep, noise_seed
        )
    for space, feats in gen.features.items():  # a network of another width than its space's
        dims = {f.shape[1] for f in feats.values() if len(f)}
        if dims - {X.SPACES[space].dim}:
            raise X.FeatureWeightsError(
                f"the {space} extractor gives {sorted(dims)}-dimensional features, not "
                f"{X.SPACES[space].dim}: its weights ({infos[space].get('weights')}) are not "
                f"{X.SPACES[space].description}"
            )
    t_gen = time.time() - t0
    rank, _ = world()
    result: dict[str, Any] = {}
    if rank == 0:  # real features are cached: one process computes them
        real: dict[str, dict[int, np.ndarray]] = {}
        if plan.reference is None:
            real = {
                space: real_features(
                    datamodule, protocol, extractors[space], infos[space], real_per_class,
                    cache_dir, device,
                )
                for space in extractors
            }  # fmt: skip
        lpips = None
        if lpips_model is not None:
            size, bs = infos["lpips"]["size"], int(protocol.batch_size)
            lpips = LPIPSPerClass(
                {
                    c: lpips_diversity(x, lpips_model, size=size, batch_size=bs, device=device)
                    for c, x in gen.images.items()
                },
                keep,
            )
        metrics: dict[str, Any] = {"overall": {}, "per_split": {}, "per_class": {}}
        is_unavailable = infos.get("inception", {}).get("is_unavailable")
        for comp in comps:
            values = evaluate_comparison(comp, gen, real, plan, protocol, is_unavailable, lpips)
            if comp.kind == "overall":
                metrics["overall"] = values
            elif comp.kind == "split":
                metrics["per_split"][comp.name] = values
            else:
                metrics["per_class"][comp.name] = values
        settings = OmegaConf.to_container(protocol, resolve=True)
        settings["features"] = dict(plan.spaces)  # resolved: every feature metric's space
        reference = (
            plan.reference.origin([c.name for c in comps])
            if plan.reference is not None
            else dataset_reference(datamodule)
        )
        result = {
            "metrics": metrics,
            "protocol": settings,
            "extractors": infos,
            "reference": reference,
            "generated_per_class": per_class,
            "seconds": {"generate_and_features": t_gen, "total": time.time() - t0},
        }
    barrier()
    return result
