"""The evaluation protocol of the synthetic benchmark (``eval=toy``): generate points of every
class with the protocol's sampler and guidance, and score them against the known mixture
(:mod:`lt_diffusion.evaluation.toy_metrics`) per class, per Many / Medium / Few split and
overall, into the metrics part of an ordinary record (:mod:`lt_diffusion.evaluation.record`),
so ``lt_diffusion.table`` aggregates toy records like image records.

Per class, ``eval.per_class.generated`` points are compared with ``real_per_class`` fresh true
draws of the class (the source's balanced reference split, a seeded choice; ``eval.reference_split:
validation`` takes the validation split instead, for choosing hyperparameters) for the
distances, and with the mixture itself for the mode metrics.

``eval.generator`` says what generates the points: ``model`` (the checkpoint's network), or
one of the floors of :mod:`lt_diffusion.evaluation.toy_floors` (``true_score``, ``class_gmm``,
``true_draws``), which use the checkpoint only for its data (the training points of
``class_gmm``, the memorisation metric's training set); the record says which. A split's value (and the overall value) is the
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
from torch import Tensor

from lt_diffusion.data.splits import SPLITS
from lt_diffusion.data.toy import GaussianMixtureClasses
from lt_diffusion.diffusion import gather_order, generate_vectors
from lt_diffusion.evaluation import toy_floors as TF
from lt_diffusion.evaluation import toy_metrics as TM
from lt_diffusion.evaluation.distributed import barrier, gather_objects, world
from lt_diffusion.evaluation.protocol import comparisons, images_per_class
from lt_diffusion.evaluation.reference import choose_real
from lt_diffusion.records.metrics import Comparison, compare
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


def reference_entry(protocol: DictConfig) -> dict[str, Any]:
    """The record's "reference": :data:`REFERENCE`, with the split the points were compared
    with."""
    split = str(protocol.get("reference_split", "test"))
    if split == "test":
        return dict(REFERENCE)
    description = REFERENCE["description"].replace("balanced reference split", f"{split} split")
    return {**REFERENCE, "split": split, "description": description}


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
    generator = protocol.get("generator", "model")
    if generator not in TF.GENERATORS:
        raise ValueError(f"eval.generator must be one of {TF.GENERATORS}, got {generator!r}")
    if protocol.get("reference"):  # the image protocols' statistics file
        raise ValueError(
            f"eval.reference={protocol.get('reference')}: a statistics file stands in for real "
            "images' features; the toy protocol compares points with the source's own draws. "
            "Leave eval.reference null and choose the draws with eval.reference_split "
            f"({' | '.join(REFERENCES)})"
        )
    if protocol.get("reference_split", "test") not in REFERENCES:
        raise ValueError(
            f"eval.reference_split must be one of {REFERENCES} (the source's split the points "
            f"are compared with), got {protocol.get('reference_split')!r}"
        )
    if "memorization" in wanted and not float(protocol.get("memorization_radius") or 0) > 0:
        raise ValueError(
            f"eval.memorization_radius must be > 0, got {protocol.get('memorization_radius')}"
        )
    for kind in ("overall", "per_split"):
        if (protocol.get(kind) or {}).get("generated"):
            raise ValueError(
                f"eval.{kind}.generated: the toy protocol compares classes only (a split's value "
                "is the mean of its classes'); set eval.per_class.generated instead"
            )
    return wanted


# What a floor's record says about its points (the checkpoint's network made none of them).
FLOOR_NOTES = {
    "true_score": "floor: the exact score of the true densities through the protocol's sampler "
    "(the checkpoint's network is not used)",
    "class_gmm": "floor: per class, a Gaussian mixture fitted to the class's own training points "
    "(the checkpoint's network is not used)",
    "true_draws": "floor: fresh draws of the true class densities (the checkpoint's network is "
    "not used)",
}
# Which of the source's splits the generated points are compared with.
REFERENCES = ("test", "validation")


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


def training_modes(datamodule: Any) -> np.ndarray:
    """``(C, K)`` bool, in the datamodule's class order: which sub-modes of each class its
    training data show (all, except the transfer variant's hidden ones)."""
    modes = getattr(datamodule.source, "training_modes", None)
    if modes is None:
        mix = datamodule.source.mixture
        return np.ones((mix.num_classes, mix.modes_per_class), dtype=bool)
    return np.asarray(modes)[np.asarray(datamodule.perm)]


def class_entry(
    truth: GaussianMixtureClasses,
    real: np.ndarray,
    generated: np.ndarray,
    label: int,
    wanted: list[str],
    protocol: DictConfig,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One class's record entry: the counts and every wanted metric (from the registry).
    ``extra``: the run's ``training_modes`` and ``train_points`` (default: every sub-mode, no
    training points)."""
    bandwidth = protocol.get("mmd_bandwidth")
    radius = float(protocol.get("memorization_radius") or 0.0)
    extra = {
        "training_modes": np.ones(truth.weights.shape, dtype=bool),
        "train_points": np.zeros((0, truth.dim)),
        **(extra or {}),
        "truth": truth,
        "label": label,
        "bandwidth": truth.hit_radius if bandwidth is None else float(bandwidth),
        # In units of a mode's typical spread std sqrt(D): comparable across dimensions.
        "memorization_radius": radius * truth.std * np.sqrt(truth.dim),
    }
    return compare(Comparison(real, generated, settings=protocol, extra=extra), wanted)


def mean_entry(entries: list[dict[str, Any]], wanted: list[str]) -> dict[str, Any]:
    """A split's (or the overall) entry: summed counts, the mean of each metric over the
    classes that have it (None, with the reason, when none has)."""
    out: dict[str, Any] = {
        "n_generated": sum(e["n_generated"] for e in entries),
        "n_real": sum(e["n_real"] for e in entries),
    }
    notes = [f"mean of the values of its {len(entries)} classes"]
    for m in wanted:
        values = [e[m] for e in entries if e.get(m) is not None]
        if not values:
            out[m] = None
            out[f"{m}_unavailable"] = next(
                (e[f"{m}_unavailable"] for e in entries if e.get(f"{m}_unavailable")),
                f"no class has {m}",
            )
            continue
        out[m] = float(np.mean(values))
        if len(values) < len(entries):
            notes.append(f"{m}: mean of the {len(values)} classes that have it")
    for key in ("memorization_radius",):  # the setting a metric was computed with
        if key in entries[0]:
            out[key] = entries[0][key]
    out["notes"] = notes
    return out


def reference_points(datamodule: Any, protocol: DictConfig) -> tuple[Tensor, Tensor]:
    """The real points the protocol compares with (``eval.reference_split``), in the datamodule's
    class order: the test draws, or the validation draws (refused when they share a point
    with the test draws: choosing on them would be choosing on the test set)."""
    if protocol.get("reference_split", "test") == "test":
        return datamodule.reference_set()
    source = datamodule.source
    if not hasattr(source, "n_validation"):
        raise ValueError(f"the {datamodule.name} source has no validation split")
    val, test = source.load("validation"), source.load("test")
    seen = {row.tobytes() for row in test.points}
    shared = sum(row.tobytes() in seen for row in val.points)
    if shared:
        raise ValueError(
            f"the validation reference shares {shared} points with the test draws: "
            "hyperparameters chosen on it would be chosen on the test set. Draw it from another "
            "seed (dataset.source.validation_seed) or its own stream (null)"
        )
    labels = torch.from_numpy(np.asarray(datamodule.old_to_new)[val.labels]).long()
    return torch.from_numpy(val.points), labels


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
    generator = str(protocol.get("generator", "model"))
    num_classes, splits = dataset_info["num_classes"], dataset_info["splits"]
    truth = class_truth(datamodule)
    reference, ref_labels = reference_points(datamodule, protocol)
    real_available = torch.bincount(ref_labels, minlength=num_classes).tolist()
    comps = comparisons(protocol, num_classes, splits, real_available)
    per_class = images_per_class(comps, num_classes)
    train_x = datamodule.train_images.cpu().numpy().astype(np.float64)
    train_y = datamodule.train_labels.cpu().numpy()

    t0 = time.time()
    rank, size = world()
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])
    bs, seed = int(protocol.batch_size), int(protocol.seed)
    gen_seed = seed if noise_seed is None else int(noise_seed)  # eval.repeats: other noise
    points = None
    if generator in ("model", "true_score"):
        if generator == "true_score":
            counts = np.asarray(datamodule.class_counts, dtype=np.float64)
            prior = counts / counts.sum()
            model = TF.TrueScoreDenoiser(truth, sampler.schedule, prior).to(device)
        with torch_threads(protocol.get("threads"), "eval.threads"):
            points = generate_vectors(
                model, sampler, labels, seed=gen_seed, batch_size=bs, guidance=guidance,
                device=device, rank=rank, world_size=size, progress=rank == 0,
            )  # fmt: skip
        points = gather_order(gather_objects(points), len(labels), bs).numpy()
    t_gen = time.time() - t0
    result: dict[str, Any] = {}
    if rank == 0:
        extra = {"training_modes": training_modes(datamodule), "train_points": train_x}
        entries = {}
        for comp in comps:  # one comparison per class (the protocol has per_class only)
            (c,), (n_gen,), (n_real,) = comp.classes, comp.generated, comp.real
            real_c = reference[ref_labels == c]
            real = real_c[choose_real(len(real_c), n_real, seed + c)].numpy()
            if generator == "true_draws":
                fake = TF.true_draws(truth, c, n_gen, gen_seed)
            elif generator == "class_gmm":
                fake = TF.class_gmm_points(
                    train_x[train_y == c], truth.modes_per_class, c, n_gen, gen_seed
                )
            else:
                fake = points[labels.numpy() == c][:n_gen]
            entries[c] = class_entry(truth, real, fake, c, wanted, protocol, extra)
        metrics: dict[str, Any] = {
            "overall": mean_entry(list(entries.values()), wanted),
            "per_split": {
                s: mean_entry([entries[c] for c in entries if splits[c] == s], wanted)
                for s in SPLITS
                if any(splits[c] == s for c in entries)
            },
            "per_class": {f"class_{c:03d}": e for c, e in entries.items()},
        }
        if generator != "model":
            metrics["overall"]["notes"].append(FLOOR_NOTES[generator])
        result = {
            "metrics": metrics,
            "protocol": OmegaConf.to_container(protocol, resolve=True),
            "extractors": {},
            "reference": reference_entry(protocol),
            "generated_per_class": per_class,
            "seconds": {"generate": t_gen, "total": time.time() - t0},
        }
    barrier()
    return result
