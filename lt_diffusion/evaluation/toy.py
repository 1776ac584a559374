"""The evaluation protocol of the synthetic benchmark (``eval=toy``): generate points of every
class with the protocol's sampler and guidance, and score them against the known mixture
(:mod:`lt_diffusion.evaluation.toy_metrics`) per class, per Many / Medium / Few split and
overall, into the metrics part of an ordinary record (:mod:`lt_diffusion.evaluation.record`),
so ``lt_diffusion.table`` aggregates toy records like image records.

Per class, ``eval.per_class.generated`` points are compared with ``real_per_class`` fresh true
draws of the class (the source's balanced reference split, a seeded choice) for the distances,
and with the mixture itself for the mode metrics. A split's value (and the overall value) is the
**mean of its classes' values**: a distance of the pooled points would not see two classes
swapping modes, which is exactly the failure the benchmark measures.

:func:`run_toy_protocol` takes the keyword arguments of
:func:`lt_diffusion.evaluation.evaluator.run_protocol` and returns the same keys, so the
evaluate command picks one or the other by the model (points or images).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.data.splits import SPLITS
from lt_diffusion.data.toy import GaussianMixtureClasses
from lt_diffusion.diffusion import gather_order, generate_vectors
from lt_diffusion.evaluation import toy_metrics as TM
from lt_diffusion.evaluation.distributed import barrier, gather_objects, world
from lt_diffusion.evaluation.metrics import Comparison, compare
from lt_diffusion.evaluation.protocol import comparisons, images_per_class
from lt_diffusion.evaluation.reference import choose_real
from lt_diffusion.utils.threads import torch_threads

# What the record's "reference" says: no feature extractor (the record's extractors are
# empty), the metrics read the points and the mixture themselves.
REFERENCE = {
    "origin": "dataset",
    "split": "test",
    "description": "fresh true draws of each class (the source's balanced reference split, "
    "real_per_class a class) for the distances, and the known mixture itself for the mode "
    "metrics; no feature extractor: the metrics read the points",
}


def check_toy_protocol(protocol: DictConfig) -> list[str]:
    """The protocol's metrics, or a clear error for an image protocol or too few points."""
    wanted = list(protocol.get("metrics") or [])
    unknown = [m for m in wanted if m not in TM.TOY_METRICS]
    if not wanted or unknown:
        raise ValueError(
            f"the model generates points (the synthetic benchmark) but eval={protocol.get('name')} "
            f"asks for {unknown or 'no metrics'}: evaluate it with eval=toy (metrics "
            f"{', '.join(TM.TOY_METRICS)})"
        )
    per_class = protocol.get("per_class") or {}
    for key in ("generated", "real_per_class"):
        if int(per_class.get(key) or 0) < 2:
            raise ValueError(
                f"eval.per_class.{key} must be at least 2 points per class (MMD needs pairs), "
                f"got {per_class.get(key)}"
            )
    for kind in ("overall", "per_split"):
        if (protocol.get(kind) or {}).get("generated"):
            raise ValueError(
                f"eval.{kind}.generated: the toy protocol compares classes only (a split's value "
                "is the mean of its classes'); set eval.per_class.generated instead"
            )
    return wanted


def class_truth(datamodule: Any) -> GaussianMixtureClasses:
    """The source's mixture with its classes in the datamodule's order (class 0 the most
    frequent after the long-tail construction)."""
    mixture = getattr(datamodule.source, "mixture", None)
    if not isinstance(mixture, GaussianMixtureClasses):
        raise ValueError(
            f"the {datamodule.name} source has no known mixture (source.mixture): the toy "
            "metrics need the synthetic benchmark's data (dataset=toy2d / toy16d)"
        )
    perm = np.asarray(datamodule.perm)
    return GaussianMixtureClasses(
        mixture.means[perm], mixture.weights[perm], mixture.std, mixture.hit_quantile
    )


def class_entry(
    truth: GaussianMixtureClasses,
    real: np.ndarray,
    generated: np.ndarray,
    label: int,
    wanted: list[str],
    protocol: DictConfig,
) -> dict[str, Any]:
    """One class's record entry: the counts and every wanted metric (from the registry)."""
    bandwidth = protocol.get("mmd_bandwidth")
    extra = {
        "truth": truth,
        "label": label,
        "bandwidth": truth.hit_radius if bandwidth is None else float(bandwidth),
    }
    return compare(Comparison(real, generated, settings=protocol, extra=extra), wanted)


def mean_entry(entries: list[dict[str, Any]], wanted: list[str]) -> dict[str, Any]:
    """A split's (or the overall) entry: summed counts, the mean of each metric."""
    return {
        "n_generated": sum(e["n_generated"] for e in entries),
        "n_real": sum(e["n_real"] for e in entries),
        **{m: float(np.mean([e[m] for e in entries])) for m in wanted},
        "notes": [f"mean of the values of its {len(entries)} classes"],
    }


def run_toy_protocol(
    *,
    protocol: DictConfig,
    dataset_info: dict[str, Any],
    datamodule: Any,
    device: torch.device,
    model: torch.nn.Module | None = None,
    sampler: Any = None,
    guidance: float = 0.0,
    cache_dir: Path | None = None,
    folder: Any = None,
    noise_seed: int | None = None,
) -> dict[str, Any]:
    """Run ``eval=toy``; returns ``{"metrics", "protocol", "extractors", "reference",
    "generated_per_class", "seconds"}`` on rank 0 ({} elsewhere). ``cache_dir`` is unused
    (nothing to cache); ``noise_seed`` seeds the generation (default ``protocol.seed``, which
    also picks the real draws)."""
    if model is None or folder is not None:
        raise ValueError(
            "the synthetic benchmark evaluates a checkpoint (checkpoint=...): its points are "
            "generated, not read from an image folder"
        )
    wanted = check_toy_protocol(protocol)
    num_classes, splits = dataset_info["num_classes"], dataset_info["splits"]
    truth = class_truth(datamodule)
    _, ref_labels = datamodule.reference_set()
    real_available = torch.bincount(ref_labels, minlength=num_classes).tolist()
    comps = comparisons(protocol, num_classes, splits, real_available)
    per_class = images_per_class(comps, num_classes)

    t0 = time.time()
    rank, size = world()
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])
    bs, seed = int(protocol.batch_size), int(protocol.seed)
    with torch_threads(protocol.get("threads"), "eval.threads"):
        points = generate_vectors(
            model, sampler, labels, seed=seed if noise_seed is None else noise_seed,
            batch_size=bs, guidance=guidance, device=device,
            rank=rank, world_size=size, progress=rank == 0,
        )  # fmt: skip
    points = gather_order(gather_objects(points), len(labels), bs).numpy()
    t_gen = time.time() - t0
    result: dict[str, Any] = {}
    if rank == 0:
        by_class = {c: points[labels.numpy() == c] for c in range(num_classes)}
        entries = {}
        for comp in comps:  # one comparison per class (the protocol has per_class only)
            (c,), (n_gen,), (n_real,) = comp.classes, comp.generated, comp.real
            reference, _ = datamodule.reference_set([c])
            real = reference[choose_real(len(reference), n_real, seed + c)].numpy()
            entries[c] = class_entry(truth, real, by_class[c][:n_gen], c, wanted, protocol)
        metrics: dict[str, Any] = {
            "overall": mean_entry(list(entries.values()), wanted),
            "per_split": {
                s: mean_entry([entries[c] for c in entries if splits[c] == s], wanted)
                for s in SPLITS
                if any(splits[c] == s for c in entries)
            },
            "per_class": {f"class_{c:03d}": e for c, e in entries.items()},
        }
        result = {
            "metrics": metrics,
            "protocol": OmegaConf.to_container(protocol, resolve=True),
            "extractors": {},
            "reference": dict(REFERENCE),
            "generated_per_class": per_class,
            "seconds": {"generate": t_gen, "total": time.time() - t0},
        }
    barrier()
    return result
