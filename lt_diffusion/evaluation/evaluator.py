"""The evaluation protocol: generate (or read) exactly class-balanced images, extract Inception
features, compare them with the balanced real set overall, per split and per class, and write
one record.

Work is split across ranks (torchrun / DDP) in fixed chunks of ``eval.batch_size``: generation
and feature extraction of chunk k happen on rank ``k % world_size`` with noise seeded by k, so
the record does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lt_diffusion.diffusion import gather_order, generate
from lt_diffusion.diffusion.generate import chunk_ranges
from lt_diffusion.evaluation import metrics as M
from lt_diffusion.evaluation.distributed import barrier, gather_objects, world
from lt_diffusion.evaluation.diversity import check_lpips_size, load_lpips, lpips_diversity
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.inception import load_extractor
from lt_diffusion.evaluation.protocol import (
    Comparison,
    comparisons,
    images_per_class,
    real_images_per_class,
)
from lt_diffusion.evaluation.record import write_record
from lt_diffusion.evaluation.reference import cache_key, cached_features, choose_real


@dataclass
class Generated:
    """Features of the generated images, grouped by class (in generation order), and the first
    images of each class when a metric needs pixels (LPIPS diversity)."""

    pool: dict[int, np.ndarray]
    logits: dict[int, np.ndarray] | None
    images: dict[int, Tensor] | None = None


@dataclass
class LPIPSPerClass:
    """Each class's mean pairwise LPIPS over its first ``images`` generated images."""

    values: dict[int, float]
    images: int


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


def generated_features(
    model: torch.nn.Module,
    sampler: Any,
    per_class: list[int],
    protocol: DictConfig,
    guidance: float,
    extractor: torch.nn.Module,
    device: torch.device,
    keep_images: int = 0,
    noise_seed: int | None = None,
) -> Generated:
    """Generate and featurise this rank's chunks, gather, restore global order; keep the first
    ``keep_images`` images of each class. ``noise_seed``: the generation's seed (default
    ``protocol.seed``)."""
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
    feats = extract_features(images, extractor, batch_size=bs, device=device, progress=rank == 0)
    if keep_images:  # this rank's images among the first of their class, by global index
        ranges = chunk_ranges(len(labels), bs, rank, size)
        mine = torch.cat(
            [torch.arange(a, b) for a, b in ranges] or [torch.zeros(0, dtype=torch.long)]
        )
        wanted = _first_of_class(labels, keep_images)[mine]
        feats["kept"] = (mine[wanted], images[wanted])
    parts = gather_objects(feats)
    pool = gather_order([torch.from_numpy(p["pool"]) for p in parts], len(labels), bs).numpy()
    logits = None
    if feats["logits"] is not None:
        logits_t = [torch.from_numpy(p["logits"]) for p in parts]
        logits = _by_class(gather_order(logits_t, len(labels), bs).numpy(), labels, len(per_class))
    kept = None
    if keep_images:
        index = torch.cat([p["kept"][0] for p in parts])
        pixels = torch.cat([p["kept"][1] for p in parts])[index.argsort()]
        kept = _images_by_class(pixels, labels[index.sort().values], len(per_class))
    return Generated(_by_class(pool, labels, len(per_class)), logits, kept)


def _images_by_class(images: Tensor, labels: Tensor, num_classes: int) -> dict[int, Tensor]:
    return {c: images[labels == c] for c in range(num_classes)}


def folder_features(
    images: Tensor,
    labels: Tensor,
    per_class: list[int],
    protocol: DictConfig,
    extractor,
    device,
    keep_images: int = 0,
) -> Generated:
    """Features of a folder of generated images: the first ``per_class[c]`` of each class (and
    the first ``keep_images`` images of each class)."""
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:n] for c, n in enumerate(per_class)])
    feats = extract_features(images[keep], extractor, int(protocol.batch_size), device, True)
    pool = _by_class(feats["pool"], labels[keep], len(per_class))
    logits = feats["logits"]
    kept = None
    if keep_images:
        first = _first_of_class(labels[keep], keep_images)
        kept = _images_by_class(images[keep][first], labels[keep][first], len(per_class))
    return Generated(
        pool, None if logits is None else _by_class(logits, labels[keep], len(per_class)), kept
    )


def real_features(
    datamodule: Any,
    protocol: DictConfig,
    extractor: torch.nn.Module,
    extractor_info: dict[str, Any],
    real_per_class: dict[int, int],
    cache_dir: Path,
    device: torch.device,
) -> dict[int, np.ndarray]:
    """Pool features of ``real_per_class[c]`` real images of each class ``c`` (a seeded
    choice among the reference images of ``c``), cached under a key that holds the SHA-256 of
    the chosen images' pixels: another data root with other pixels under the same dataset name
    and counts never reuses them (hashing costs far less than the Inception passes)."""
    info = datamodule.info()
    out = {}
    for c, n in real_per_class.items():
        images, _ = datamodule.reference_set([c])
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
            extractor=extractor_info["weights_sha256"],
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


def compare(
    comp: Comparison,
    gen: Generated,
    real: dict[int, np.ndarray],
    wanted: list[str],
    protocol: DictConfig,
    is_unavailable: str | None = None,
    lpips: LPIPSPerClass | None = None,
) -> dict[str, Any]:
    """Every wanted metric of one comparison (a record entry, through the metric registry),
    with the counts and settings it used."""
    pairs = list(zip(comp.classes, comp.generated))
    seed = int(protocol.seed)
    logits = None
    if gen.logits is not None:
        logits = np.concatenate([gen.logits[c][:n] for c, n in pairs])
    out = M.compare(
        M.Comparison(
            real=np.concatenate(
                [_real_of(real, c, n, seed) for c, n in zip(comp.classes, comp.real)]
            ),
            fake=np.concatenate([gen.pool[c][:n] for c, n in pairs]),
            settings=protocol,
            fake_logits=logits,
            is_unavailable=is_unavailable,
            extra={}
            if lpips is None
            else {
                "lpips_per_class": [lpips.values[c] for c in comp.classes],
                "lpips_images": lpips.images,
            },
        ),
        wanted,
    )
    if len(set(comp.generated)) > 1:
        out["generated_per_class"] = list(comp.generated)
    out["real_per_class"] = comp.real[0] if len(set(comp.real)) == 1 else list(comp.real)
    return out


_SETTING = {"overall": "overall", "split": "per_split", "class": "per_class"}


def check_counts(
    comps: list[Comparison],
    wanted: list[str],
    protocol: DictConfig,
    generated_available: list[int] | None = None,
) -> None:
    """Refuse, before any generation, a comparison with too few real or generated images."""
    minimum = M.minimum_images(wanted, protocol)
    for comp in comps:
        setting = f"eval.{_SETTING[comp.kind]}"
        for what, n, key in (
            ("real", comp.n_real, "real_per_class"),
            ("generated", comp.n_generated, "generated"),
        ):
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
    """Run the protocol; returns ``{"metrics": ..., "protocol": ..., "extractor": ...}``.
    ``noise_seed`` seeds the generation (default ``protocol.seed``, which also picks the real
    images)."""
    wanted = M.check_metrics(list(protocol.metrics))
    num_classes = dataset_info["num_classes"]
    _, ref_labels = datamodule.reference_set()
    real_available = torch.bincount(ref_labels, minlength=num_classes).tolist()
    comps = comparisons(protocol, num_classes, dataset_info["splits"], real_available)
    per_class = images_per_class(comps, num_classes)
    real_per_class = real_images_per_class(comps)
    gen_available = None
    if folder is not None:
        gen_available = torch.bincount(folder[1], minlength=num_classes).tolist()
    check_counts(comps, wanted, protocol, gen_available)

    need_is = "is" in wanted
    extractor, ext_info = load_extractor(
        device, want_logits=need_is, require_logits=need_is and bool(protocol.require_is)
    )
    lpips_model, keep = None, 0
    if "lpips_diversity" in wanted:
        lpips_model, lpips_info, keep = prepare_lpips(protocol, dataset_info, per_class, device)
        ext_info = {**ext_info, "lpips": lpips_info}
    t0 = time.time()
    if folder is not None:
        gen = folder_features(*folder, per_class, protocol, extractor, device, keep)
    else:
        gen = generated_features(
            model, sampler, per_class, protocol, guidance, extractor, device, keep, noise_seed
        )
    t_gen = time.time() - t0
    rank, _ = world()
    result: dict[str, Any] = {}
    if rank == 0:  # real features are cached: one process computes them
        real = real_features(
            datamodule, protocol, extractor, ext_info, real_per_class, cache_dir, device
        )
        lpips = None
        if lpips_model is not None:
            size, bs = ext_info["lpips"]["size"], int(protocol.batch_size)
            lpips = LPIPSPerClass(
                {
                    c: lpips_diversity(x, lpips_model, size=size, batch_size=bs, device=device)
                    for c, x in gen.images.items()
                },
                keep,
            )
        metrics: dict[str, Any] = {"overall": {}, "per_split": {}, "per_class": {}}
        for comp in comps:
            values = compare(
                comp, gen, real, wanted, protocol, ext_info.get("is_unavailable"), lpips
            )
            if comp.kind == "overall":
                metrics["overall"] = values
            elif comp.kind == "split":
                metrics["per_split"][comp.name] = values
            else:
                metrics["per_class"][comp.name] = values
        result = {
            "metrics": metrics,
            "protocol": OmegaConf.to_container(protocol, resolve=True),
            "extractor": ext_info,
            "generated_per_class": per_class,
            "seconds": {"generate_and_features": t_gen, "total": time.time() - t0},
        }
    barrier()
    return result


def save_record(path: Path, record: dict[str, Any]) -> Path:
    return write_record(path, record)
