"""Composing the project's Hydra configs from code (sweeps, jobs, tables), exactly as the
command line would compose them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig

from lt_diffusion.runtime import CONFIG_DIR


def compose_config(
    name: str, overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR
) -> DictConfig:
    """``configs/<name>.yaml`` composed with ``overrides``.

    Also callable inside a running Hydra app (a sweep job composes its run's config): the
    app's global Hydra state is set aside for the composition and restored afterwards.
    """
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve())):
            return compose(config_name=name, overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)
