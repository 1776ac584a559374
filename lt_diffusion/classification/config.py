"""What a classification run is, from its composed config (``configs/classify.yaml``): the
checks before any work, the generator run an augmented run draws images from, the settings
digest that names its record, and how a table tells a classification row from a generation row.

Light on purpose (Hydra and OmegaConf only): the table command imports it to plan a sweep.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lt_diffusion.runtime import CONFIG_DIR
from lt_diffusion.utils.config import compose_config
from lt_diffusion.utils.identity import digest, training_settings

TASK = "classify"  # the primary config (configs/classify.yaml) and the composed config's `task`
# Experiment files under configs/experiment/classify/ are classification rows: composed with
# configs/classify.yaml, run by lt_diffusion.classify. Every other row trains a diffusion model.
EXPERIMENT_PREFIX = "classify/"
RULES = ("none", "balanced", "fill_to_head")


def experiment_task(experiment: str) -> str:
    """``"classify"`` for a row under ``configs/experiment/classify/``, else ``"train"``: the
    primary config a row composes with (and the command that runs it)."""
    return TASK if str(experiment).startswith(EXPERIMENT_PREFIX) else "train"


@cache
def _known_keys(config_dir: str) -> frozenset[str]:
    """The keys ``classify.yaml`` and its groups define, plus those of the sampler group that
    ``augment/generated.yaml`` places at ``augment.sampler``."""
    import yaml

    from lt_diffusion.training.config_keys import defined_keys

    def walk(node: object, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        out = []
        for key, value in node.items():
            out += [f"{prefix}.{key}", *walk(value, f"{prefix}.{key}")]
        return out

    keys = set(defined_keys(config_dir, TASK)) | {"augment.sampler"}
    for path in (Path(config_dir) / "sampler").glob("*.yaml"):
        keys.update(walk(yaml.safe_load(path.read_text()) or {}, "augment.sampler"))
    return frozenset(keys)


def check_config(cfg: DictConfig, config_dir: str | Path = CONFIG_DIR) -> None:
    """Refuse, before any work, a config that is not a classification run or has keys nothing
    reads, an unknown augmentation rule, or a generator named twice / not at all."""
    from lt_diffusion.training.config_keys import unknown_keys

    if cfg.get("task") != TASK:
        raise ValueError(
            f"this is not a classification config (task={cfg.get('task')!r}): compose "
            "configs/classify.yaml (python -m lt_diffusion.classify ...); diffusion runs go "
            "through lt_diffusion.train"
        )
    problems = unknown_keys(cfg, _known_keys(str(config_dir)))
    if problems:
        raise ValueError(
            "Unknown config keys (a typo, or a key this version does not have):\n  "
            + "\n  ".join(problems)
            + "\nFix or remove these overrides (python -m lt_diffusion.classify --cfg job shows "
            "the composed config)."
        )
    train = cfg.train
    if int(train.epochs) < 1:
        raise ValueError(f"train.epochs must be >= 1, got {train.epochs}")
    if not 0 <= int(train.warmup_epochs) < int(train.epochs):
        raise ValueError(
            f"train.warmup_epochs must be in [0, train.epochs={train.epochs}), got "
            f"{train.warmup_epochs}"
        )
    epochs = int(train.epochs)
    if list(train.milestones) != sorted(train.milestones) or any(
        not 1 <= m < epochs for m in train.milestones
    ):
        raise ValueError(
            f"train.milestones must be increasing epochs in [1, train.epochs={epochs}), got "
            f"{list(train.milestones)}: scale them with train.epochs"
        )
    drw = cfg.loss.fn.get("drw_epoch")
    if drw is not None and int(drw) >= epochs:  # a shortened run would silently skip DRW
        raise ValueError(
            f"loss.fn.drw_epoch={drw} is not before train.epochs={epochs}: deferred re-weighting "
            "would never start; set loss.fn.drw_epoch below train.epochs (Cao et al.: 160 of 200)"
        )
    if train.max_steps is not None and int(train.max_steps) < 1:
        raise ValueError(f"train.max_steps must be >= 1 or null, got {train.max_steps}")
    if int(train.crop_padding) < 0:
        raise ValueError(f"train.crop_padding must be >= 0, got {train.crop_padding}")
    aug = cfg.augment
    if aug.rule not in RULES:
        raise ValueError(f"augment.rule must be one of {', '.join(RULES)}, got {aug.rule!r}")
    if aug.rule == "none":
        return
    if aug.rule == "balanced" and (aug.get("total") is None or int(aug.total) < 1):
        raise ValueError(f"augment.rule=balanced needs augment.total >= 1, got {aug.get('total')}")
    experiment, checkpoint = aug.generator.experiment, aug.checkpoint
    if (experiment is None) == (checkpoint is None):
        raise ValueError(
            "augmentation needs one generator: augment.generator.experiment=<a configs/experiment "
            "row, trained first if needed> or augment.checkpoint=<a last.ckpt>, not both"
        )
    if experiment is not None and experiment_task(experiment) != "train":
        raise ValueError(
            f"augment.generator.experiment={experiment} is a classification row: name a "
            "diffusion row (e.g. cm/cifar100_lt_ir100_cm)"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"augment.checkpoint={checkpoint} does not exist: point it at a trained run's "
            "checkpoints/last.ckpt (or name the run: augment.generator.experiment=...)"
        )


def generator_config(cfg: DictConfig, config_dir: str | Path = CONFIG_DIR) -> DictConfig | None:
    """The training config of the run that generates the augmentation images
    (``augment.generator``: its experiment, seed and overrides, under this run's data, output
    and cache folders), with its run directory set; None without one."""
    aug = cfg.augment
    if aug.rule == "none" or aug.generator.get("experiment") is None:
        return None
    paths = [f"paths.{k}={cfg.paths[k]}" for k in ("data_root", "output_dir", "cache_dir")]
    overrides = [
        f"experiment={aug.generator.experiment}",
        f"seed={aug.generator.seed}",
        *paths,
        *aug.generator.overrides,
    ]
    try:
        gen = compose_config("train", overrides, config_dir)
    except Exception as err:
        raise ValueError(f"augment.generator ({overrides}) does not compose: {err}") from err
    with open_dict(gen):
        gen.paths.run_dir = str(Path(gen.paths.output_dir) / "runs" / str(gen.run_name))
        # The generator trains where the classifier does (a table's trainer=gpu reaches both,
        # so G.8's generators are Table 2's runs), unless its own overrides choose a trainer.
        if not any(_root_key(o) == "trainer" for o in aug.generator.overrides):
            gen.trainer = OmegaConf.to_container(cfg.trainer, resolve=False)
    return gen


def _root_key(override: str) -> str:
    """``trainer`` of ``trainer=gpu``, ``+trainer.devices=2`` or ``~trainer``."""
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0]


def classification_identity(cfg: DictConfig, config_dir: str | Path = CONFIG_DIR) -> dict[str, Any]:
    """The digests that identify a classification run's record: ``{"digest", "train"}`` plus
    ``"generator"`` (the training settings of the generator run, composed as the run will
    compose it) for an augmented run. Every setting of the run defines its record (the test
    evaluation has no settings of its own), locations and logging excepted
    (:func:`lt_diffusion.utils.identity.training_settings`)."""
    parts = {"train": digest(training_settings(cfg))}
    gen = generator_config(cfg, config_dir)
    if gen is not None:
        parts["generator"] = digest(training_settings(gen))
    return {"digest": digest(parts, 8), **parts}


def classification_record_filename(identity_digest: str) -> str:
    """``<run_dir>/records/<this>``: the test evaluation, by the run's settings digest."""
    return f"classify-test-{identity_digest}.json"
