"""Classification metrics on a test set, as record entries, and their registry entries.

Every comparison (overall, a Many / Medium / Few split, one class) is the set of test images
whose *true* class belongs to it, and holds (in %, as the papers' tables print them):

* ``accuracy``: correct predictions / images of the comparison (top-1);
* ``macro_recall``: the mean over the comparison's classes of each class's recall (on a
  balanced test set this equals ``accuracy``);
* ``macro_precision``: the mean over the comparison's classes of each class's precision, a
  class's precision counting every test prediction of that class (false positives come from
  any class). A class the model never predicts has precision 0 (torchmetrics' and
  scikit-learn's convention); the entry's notes name such classes.

Per-class true / false positives and false negatives come from torchmetrics
(``multiclass_stat_scores``, integers); the ratios and their means are taken in float64.
The registry entries (:data:`lt_diffusion.evaluation.metrics.METRICS`) let table specs name
``per_split.few.accuracy`` and records validate the numbers; they cannot be computed from image
features, and a generation protocol that asks for them is refused before any work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lt_diffusion.records.metrics import Metric, register

CLASSIFICATION_METRICS = ("accuracy", "macro_precision", "macro_recall")


def _refuse(name: str) -> Any:
    def refuse(*_: Any) -> Any:
        raise ValueError(
            f"{name} is a classification metric (python -m lt_diffusion.classify computes it on "
            "a test set), not one of generated images: remove it from eval.metrics"
        )

    return refuse


for _name, _label in zip(
    CLASSIFICATION_METRICS, ("Acc. (%)", "macro precision (%)", "macro recall (%)")
):
    register(Metric(_name, _label, "higher", _refuse(_name), min_images=_refuse(_name), digits=2))


def class_key(c: int) -> str:
    return f"class_{c:03d}"


def classification_metrics(
    predictions: Tensor, targets: Tensor, splits: Sequence[str]
) -> dict[str, Any]:
    """``{"overall", "per_split", "per_class"}`` record entries from top-1 ``predictions`` and
    true ``targets`` (int64, (N,)); ``splits[c]`` is class c's split. Each entry holds
    ``n_test`` (its test images) and the three metrics in %."""
    from torchmetrics.functional.classification import multiclass_stat_scores

    num_classes = len(splits)
    predictions, targets = predictions.long().cpu(), targets.long().cpu()
    if predictions.shape != targets.shape or predictions.ndim != 1 or len(targets) == 0:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must be "
            "two equally long, non-empty label vectors"
        )
    bad = [int(v) for v in (predictions.min(), predictions.max(), targets.min(), targets.max())]
    if min(bad) < 0 or max(bad) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {min(bad)}..{max(bad)}")
    # Per class [tp, fp, tn, fn, support] as integers; the ratios in float64.
    stats = multiclass_stat_scores(predictions, targets, num_classes, average=None).double()
    tp, fp, fn = stats[:, 0], stats[:, 1], stats[:, 3]
    recall = tp / (tp + fn).clamp(min=1)
    precision = tp / (tp + fp).clamp(min=1)  # never predicted: 0
    correct = predictions == targets
    support = targets.bincount(minlength=num_classes)
    never = set((predictions.bincount(minlength=num_classes) == 0).nonzero().flatten().tolist())

    def entry(classes: list[int]) -> dict[str, Any]:
        mask = (support[classes] > 0).tolist()
        present = [c for c, m in zip(classes, mask) if m]  # classes with test images
        in_it = (targets[:, None] == targets.new_tensor(classes)[None]).any(1)
        n = int(in_it.sum())
        out: dict[str, Any] = {"n_test": n}
        if n == 0:
            for name in CLASSIFICATION_METRICS:
                out[name] = None
                out[f"{name}_unavailable"] = "no test images of these classes"
            return out
        out["accuracy"] = 100.0 * float(correct[in_it].double().mean())
        out["macro_recall"] = 100.0 * float(recall[present].mean())
        out["macro_precision"] = 100.0 * float(precision[present].mean())
        unpredicted = sorted(never & set(present))
        if unpredicted:
            out["notes"] = [
                f"never predicted (precision 0): classes {unpredicted[:10]}"
                + (f" and {len(unpredicted) - 10} more" if len(unpredicted) > 10 else "")
            ]
        return out

    per_split = {
        s: entry([c for c in range(num_classes) if splits[c] == s])
        for s in ("many", "medium", "few")
        if s in splits
    }
    return {
        "overall": entry(list(range(num_classes))),
        "per_split": per_split,
        "per_class": {class_key(c): entry([c]) for c in range(num_classes)},
    }


def summary_line(metrics: Mapping[str, Any]) -> str:
    """``accuracy 41.2 | many 70.1 medium 40.5 few 6.7 | macro P 43.2 R 41.2`` for the terminal."""

    def num(entry: Mapping[str, Any], key: str) -> str:
        v = entry.get(key)
        return "-" if v is None else f"{v:.2f}"

    overall, splits = metrics["overall"], metrics["per_split"]
    parts = " ".join(f"{s} {num(e, 'accuracy')}" for s, e in splits.items())
    return (
        f"accuracy {num(overall, 'accuracy')} | {parts} | macro precision "
        f"{num(overall, 'macro_precision')} recall {num(overall, 'macro_recall')} (%)"
    )
