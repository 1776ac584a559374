"""Build every run object from the composed config (``hydra.utils.instantiate``), in one place,
so training, sampling and evaluation rebuild exactly the same pieces."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from lt_diffusion.diffusion import NoiseSchedule, Sampler
from lt_diffusion.methods import Objective


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises our own validation errors unwrapped, so the
    user reads "imbalance ratio must be >= 1 ..." rather than Hydra's wrapper around it."""
    try:
        return hydra_instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError, TypeError)):
            raise err.__cause__ from None
        raise


def build_model(cfg: DictConfig, init_state: dict[str, Tensor] | None = None) -> nn.Module:
    """The backbone, then the method's model transform if it declares one (e.g. CM's
    low-rank capacity reservation).

    ``init_state`` (weights of a plain backbone, e.g. a trained CBDM model) is loaded strictly
    *before* the transform, so fine-tuning variants start from the trained weights.
    """
    model = instantiate(cfg.model)
    if init_state is not None:
        model.load_state_dict(init_state)
    transform = cfg.method.get("model_transform") if "method" in cfg else None
    if transform is not None:
        model = instantiate(transform)(model)
    return model


def build_objective(cfg: DictConfig) -> Objective:
    return instantiate(cfg.method.objective)


def build_schedule(cfg: DictConfig) -> NoiseSchedule:
    return instantiate(cfg.diffusion)


def build_sampler(sampler_cfg: DictConfig, schedule: NoiseSchedule) -> Sampler:
    """``sampler_cfg`` is a ``sampler`` group node: ``{name, guidance, sampler: {_target_...}}``."""
    return instantiate(sampler_cfg.sampler)(schedule=schedule)


def build_datamodule(cfg: DictConfig, on_device: bool = False) -> Any:
    """The long-tailed datamodule; ``on_device`` resolves the config's ``auto``."""
    # The method may ask for a data-side change (RS: class-balanced sampling).
    sampler = cfg.method.get("data_sampler", None) or cfg.data.sampler
    return instantiate(cfg.data, sampler=sampler, on_device=on_device)
