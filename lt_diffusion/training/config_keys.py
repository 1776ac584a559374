"""Refuse config keys that nothing reads (``+train.max_step=5``, a typo Hydra itself suggests).

Hydra lets ``+key=value`` add any key, and the training silently ignores one it does not read.
After composing, every key is checked:

- a key of a node with a ``_target_`` must be an argument of that target (its signature), as
  instantiating it would otherwise fail late (the optimizer is built at the first step) or,
  with ``**kwargs``, silently swallow it;
- any other key must be one that some config of the training's composition defines at that
  place: ``train.yaml``, or a file of one of its groups (``method/``, ``experiment/`` ...), so
  the keys an experiment or a method config sets legitimately are known.

The error names each unknown key and the closest valid one (difflib).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lt_diffusion.runtime import CONFIG_DIR


def _package(path: Path, group: str) -> str:
    """The dotted place a group file's keys go (its ``# @package`` line, else the group)."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            pkg = line.split(None, 2)[2].strip()
            return "" if pkg == "_global_" else group if pkg == "_group_" else pkg
        if line.strip() and not line.startswith("#"):
            break
    return group


def _paths(node: Any, prefix: str) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults" and not prefix:
                continue
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from _paths(value, dotted)


@cache
def defined_keys(config_dir: str | Path = CONFIG_DIR, root: str = "train") -> frozenset[str]:
    """Every dotted key that ``<root>.yaml`` or a file of its config groups defines."""
    config_dir = Path(config_dir)
    top = yaml.safe_load((config_dir / f"{root}.yaml").read_text())
    keys = set(_paths(top, ""))
    for entry in top.get("defaults", []):
        name = next(iter(entry)) if isinstance(entry, dict) else entry
        group = str(name).removeprefix("optional ").strip()
        if group == "_self_" or not (config_dir / group).is_dir():
            continue
        keys.add(group)
        for path in sorted((config_dir / group).rglob("*.yaml")):
            pkg = _package(path, group)
            keys.update(_paths(yaml.safe_load(path.read_text()) or {}, pkg))
    return frozenset(keys)


def _arguments(target: str) -> set[str] | None:
    """Keyword arguments the ``_target_`` accepts; None when any is (``**kwargs``) or when
    the target cannot be inspected (instantiating it reports that)."""
    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # noqa: BLE001 - an unimportable target fails with its own error later
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def unknown_keys(cfg: DictConfig, known: frozenset[str] | None = None) -> list[str]:
    """Readable lines, one per key of ``cfg`` nothing reads, each with its closest valid key."""
    known = defined_keys() if known is None else known
    problems: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        target = node.get("_target_")
        accepted = _arguments(target) if isinstance(target, str) else None
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if key.startswith("_") and key.endswith("_"):  # _target_, _partial_ ...
                continue
            if isinstance(target, str):
                valid = accepted is None or key in accepted
                choices = sorted(accepted or ())
                what = f"an argument of {target}"
            else:
                # A callback added on the command line (+callbacks.<name>._target_=...) is built
                # by the run like the group's own; its arguments are checked against its target.
                added = prefix == "callbacks" and isinstance(value, dict) and "_target_" in value
                valid = dotted in known or added
                choices = sorted(k.rsplit(".", 1)[-1] for k in _children(known, prefix))
                what = "a key any config defines"
            if not valid:
                close = difflib.get_close_matches(key, choices, n=1)
                hint = (
                    f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
                )
                problems.append(f"{dotted} is not {what}{hint}")
            elif isinstance(value, dict):
                walk(value, dotted)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return problems


def _children(known: frozenset[str], prefix: str) -> list[str]:
    depth = prefix.count(".") + 1 if prefix else 0
    return [
        k for k in known if k.count(".") == depth and (not prefix or k.startswith(prefix + "."))
    ]


def check_known_keys(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming every key of the training config nothing reads."""
    problems = unknown_keys(cfg)
    if problems:
        raise ValueError(
            "Unknown config keys (a typo, or a key this version does not have):\n  "
            + "\n  ".join(problems)
            + "\nFix or remove these overrides (python -m lt_diffusion.train --cfg job shows the "
            "composed config)."
        )
