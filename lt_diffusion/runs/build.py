"""Build every run object from the composed config (``hydra.utils.instantiate``), in one place,
so training, sampling and evaluation rebuild exactly the same pieces."""

from __future__ import annotations

import copy
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from lt_diffusion.diffusion import NoiseSchedule, Sampler
from lt_diffusion.methods.base import Objective


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


def objective_passes(node: Any) -> int:
    """Denoiser passes per training example of the objective a config node would build (its
    class's ``passes`` and those of the objectives it wraps), read from the classes alone."""
    if not isinstance(node, DictConfig):
        return 0
    target = node.get("_target_")
    cls = get_object(target) if isinstance(target, str) else None
    own = cls.passes if isinstance(cls, type) and issubclass(cls, Objective) else 0
    return own + sum(objective_passes(v) for _, v in node.items_ex(resolve=False))


def build_schedule(cfg: DictConfig) -> NoiseSchedule:
    return instantiate(cfg.diffusion)


def resolve_sampler(sampler_cfg: DictConfig, model: nn.Module) -> DictConfig:
    """A copy of a ``sampler`` group node with ``clip_denoised: auto`` decided for ``model``:
    clip x0 to the pixel range for pixel models, never for latent ones (latents have no fixed
    range), and ``name`` the label of what runs (``ddim20``). Records store the resolved node,
    so they say what ran."""
    from lt_diffusion.diffusion.generate import is_latent_model

    out = copy.deepcopy(sampler_cfg)
    out.name = sampler_label(out)  # what runs, whatever the group file's name says
    clip = out.sampler.get("clip_denoised")
    if clip is None:
        return out
    if not (isinstance(clip, bool) or clip == "auto"):
        raise ValueError(f"sampler.sampler.clip_denoised must be true, false or auto, got {clip!r}")
    if clip == "auto":
        out.sampler.clip_denoised = not is_latent_model(model)
    return out


def build_sampler(sampler_cfg: DictConfig, schedule: NoiseSchedule) -> Sampler:
    """``sampler_cfg`` is a ``sampler`` group node: ``{name, guidance, sampler: {_target_...}}``
    whose ``clip_denoised`` is decided (:func:`resolve_sampler`)."""
    if sampler_cfg.sampler.get("clip_denoised") == "auto":
        raise ValueError("resolve clip_denoised: auto for the model first (resolve_sampler)")
    return instantiate(sampler_cfg.sampler)(schedule=schedule)


def build_datamodule(cfg: DictConfig, on_device: bool = False) -> Any:
    """The long-tailed datamodule; ``on_device`` resolves the config's ``auto``."""
    # The method may ask for a data-side change (RS: class-balanced sampling).
    sampler = cfg.method.get("data_sampler", None) or cfg.data.sampler
    return instantiate(cfg.data, sampler=sampler, on_device=on_device)


def sampler_label(node: DictConfig) -> str:
    """A short name of what a sampler node runs: its kind and number of steps (``ddim20``)."""
    target = str(node.sampler._target_).rsplit(".", 1)[-1]
    kinds = {
        "DDIMSampler": "ddim",
        "DDPMSampler": "ddpm",
        "DPMSolverSampler": "dpm_solver",
        "ConsistencySampler": "consistency",
    }
    kind = kinds.get(target, target.lower())
    steps = node.sampler.get("steps")
    return f"{kind}{steps if steps is not None else ''}" if kind != "ddpm" else "ddpm"


def check_sampler(train_cfg: DictConfig, node: DictConfig, source: str, setting: str) -> None:
    """Refuse a sampler that reads the network's output differently from how it was trained:
    a diffusion sampler (DDIM, ...) on a consistency model, or the consistency sampler on a
    diffusion model (both would give noise)."""
    kinds = {"eps": "diffusion", "consistency": "consistency"}
    wants = get_class(str(node.sampler._target_)).model_output
    has = build_objective(train_cfg).model_output
    if wants != has:
        fix = (
            "consistency (or consistency2)" if has == "consistency" else "ddim, ddpm or dpm_solver"
        )
        raise ValueError(
            f"{source} is a {kinds[has]} model (method {train_cfg.method.name}) and {setting} "
            f"is {node.name}, a sampler of {kinds[wants]} models: set {setting} to {fix}"
        )


def check_guidance(
    train_cfg: DictConfig, guidance: float, source: str, setting: str = "eval.guidance"
) -> None:
    """Refuse classifier-free guidance for a model whose training never taught it the null
    label (``cond_drop_prob = 0``): its unconditional prediction would be noise."""
    if guidance == 0.0:
        return
    objective = build_objective(train_cfg)
    if not objective.trains_null_label:
        raise ValueError(
            f"{source} was trained without label dropout (method {train_cfg.method.name}, "
            f"cond_drop_prob={train_cfg.method.objective.get('cond_drop_prob')}), so its null "
            f"label is untrained and guidance {guidance:g} would mix in noise: set {setting}=0, "
            "or train with method.objective.cond_drop_prob > 0"
        )
