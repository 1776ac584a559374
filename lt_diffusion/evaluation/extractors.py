"""The feature spaces metrics are computed in: torch-fidelity's own extractors, with weights
staged offline by the user (nothing here downloads).

=============  ===========================  ==========  =====  ===================================
space          torch-fidelity extractor     layer       dim    weights (torch hub's checkpoints/)
=============  ===========================  ==========  =====  ===================================
``inception``  ``inception-v3-compat``      ``2048``    2048   converted offline (inception.py)
``dinov2``     ``dinov2-vit-l-14``          ``dinov2``  1024   ``dinov2_vitl14_pretrain.pth`` +
                                                               the hub's ``facebookresearch_dinov2
                                                               _main/`` code folder
``vgg16``      ``vgg16``                    ``fc2_relu`` 4096  ``vgg16-397923af.pth``
``clip``       ``clip-vit-b-32``            ``clip``    512    ``clip-vit-b-32-40d36571....pt``
=============  ===========================  ==========  =====  ===================================

Every extractor takes uint8 images and resizes them itself with torch-fidelity's TF-1.x
compatible bilinear resize (299 px for Inception, 224 for the others). The layer is the one
torch-fidelity's own FID / KID / PRC use for that extractor. A protocol names, per metric, the
space it is computed in (``eval.features``, :func:`resolve`); :func:`check_staged` refuses a
protocol whose weights are missing before anything is generated, naming each file and where
it goes. The record's ``extractors`` holds each space's extractor, layer, dimension, weights
file and its SHA-256 (:func:`load`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lt_diffusion.evaluation.inception import load_extractor, sha256


class FeatureWeightsError(RuntimeError):
    """A feature space's weights are not staged, or are not what they claim to be."""


@dataclass(frozen=True)
class FeatureSpace:
    """One feature space: ``build(device) -> (extractor, weights info)`` builds torch-fidelity's
    extractor yielding ``layer``; ``missing()`` says what to stage (None when it is)."""

    name: str
    extractor: str  # torch-fidelity's registered extractor name
    layer: str
    dim: int
    description: str
    build: Callable[..., tuple[nn.Module, dict[str, Any]]]  # (device, **options)
    missing: Callable[[], str | None] = lambda: None


SPACES: dict[str, FeatureSpace] = {}


def register(space: FeatureSpace) -> FeatureSpace:
    SPACES[space.name] = space
    return space


def feature_space(
    name: str,
    extractor: str,
    layer: str,
    dim: int,
    description: str,
    missing: Callable[[], str | None] = lambda: None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated builder as feature space ``name`` (fields as :class:`FeatureSpace`)."""

    def add(build: Callable[..., Any]) -> Callable[..., Any]:
        register(FeatureSpace(name, extractor, layer, dim, description, build, missing))
        return build

    return add


def _hub() -> Path:
    return Path(torch.hub.get_dir())


def _staged(env: str, default: Path) -> Path:
    """``$env`` when set, else ``default`` (which may not exist)."""
    value = os.environ.get(env)
    return Path(value).expanduser() if value else default


def _weights_info(path: Path, prefix: str | None = None) -> dict[str, Any]:
    """The file name and SHA-256 of a staged weights file; a file named like the official
    release (``prefix``: the hash prefix in its name) must carry that hash."""
    digest = sha256(path)
    if prefix and path.name.endswith(f"{prefix}.pth") and not digest.startswith(prefix):
        raise FeatureWeightsError(
            f"{path} is named like the official weights but its SHA-256 does not start with "
            f"{prefix}: the download is corrupt; fetch it again"
        )
    return {"weights": path.name, "weights_path": str(path), "weights_sha256": digest}


def _how(files: str, fetch: str, env: str) -> str:
    return (
        f"stage {files}: on a machine with network access run `{fetch}`, which puts them under "
        f"its torch hub folder (~/.cache/torch/hub), and copy them to the same place under "
        f"{_hub()} here ({env} points at another place)"
    )


def _file_check(
    path: Callable[[], Path], what: str, fetch: str, env: str
) -> Callable[[], str | None]:
    """A feature space's ``missing``: None when the weights file ``path()`` is staged, else
    how to stage it."""

    def missing() -> str | None:
        file = path()
        if file.is_file():
            return None
        return f"{what} is not staged ({file} missing). To get it, " + _how(file.name, fetch, env)

    return missing


def _fidelity_extractor(cls: type, name: str, layer: str, path: Path, what: str) -> nn.Module:
    """torch-fidelity's extractor ``cls`` on the staged weights; a clear error for a file
    that is not ``what``."""
    try:
        return cls(name, [layer], feature_extractor_weights_path=str(path))
    except Exception as err:
        raise FeatureWeightsError(f"{path} is not {what} ({err})") from err


# ---------------------------------------------------------------------------- Inception


@feature_space(
    "inception", "inception-v3-compat", "2048", 2048,
    "Inception-V3 pool3 (the 2015-12-05 TensorFlow graph)",
)  # fmt: skip
def _inception(device: torch.device, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """inception.load_extractor; ``options``: ``want_logits``, ``require_logits`` (IS)."""
    return load_extractor(device, **options)


# ---------------------------------------------------------------------------- DINOv2

DINOV2_WEIGHTS_ENV = "LT_DIFFUSION_DINOV2_WEIGHTS"
DINOV2_REPO_ENV = "LT_DIFFUSION_DINOV2_REPO"
DINOV2_WEIGHTS_NAME = "dinov2_vitl14_pretrain.pth"
DINOV2_REPO_NAME = "facebookresearch_dinov2_main"  # torch hub's folder for the repository


def dinov2_files() -> tuple[Path, Path]:
    """``(code folder, weights file)`` where DINOv2 ViT-L/14 is looked for."""
    return (
        _staged(DINOV2_REPO_ENV, _hub() / DINOV2_REPO_NAME),
        _staged(DINOV2_WEIGHTS_ENV, _hub() / "checkpoints" / DINOV2_WEIGHTS_NAME),
    )


def _dinov2_missing() -> str | None:
    repo, weights = dinov2_files()
    absent = [str(p) for p in (repo / "hubconf.py", weights) if not p.is_file()]
    if not absent:
        return None
    return f"DINOv2 ViT-L/14 is not staged ({', '.join(absent)} missing). To get it, " + _how(
        f"the hub code folder {DINOV2_REPO_NAME}/ and {DINOV2_WEIGHTS_NAME}",
        "python -c \"import torch; torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')\"",
        f"{DINOV2_REPO_ENV} / {DINOV2_WEIGHTS_ENV}",
    )


@feature_space(
    "dinov2", "dinov2-vit-l-14", "dinov2", 1024,
    "DINOv2 ViT-L/14 CLS token (FD_DINOv2: Stein et al. 2023)", _dinov2_missing,
)  # fmt: skip
def _dinov2(device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """torch-fidelity's ``FeatureExtractorDinoV2`` around the staged network: its ``__init__``
    only fetches the code from GitHub (``torch.hub.load("facebookresearch/dinov2", ...)``),
    which cannot run offline, so the same module is loaded from the staged code folder and
    weights, and the extractor (its resize, normalisation and forward) is torch-fidelity's."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    repo, weights = dinov2_files()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="xFormers")  # optional speed-up, absent
        net = torch.hub.load(str(repo), "dinov2_vitl14", source="local", pretrained=False)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except Exception as err:  # unreadable, or another network's weights
        raise FeatureWeightsError(
            f"{weights} is not DINOv2 ViT-L/14's state dict for {repo} ({err})"
        ) from err

    class _Staged(FeatureExtractorDinoV2):
        def __init__(self) -> None:
            FeatureExtractorBase.__init__(self, "dinov2-vit-l-14", ["dinov2"])
            self.feature_extractor_internal_dtype = torch.float32
            self.model = net

    extractor = _Staged()
    extractor.__class__ = FeatureExtractorDinoV2
    extractor.requires_grad_(False).eval()
    return extractor.to(device), {**_weights_info(weights), "code": str(repo)}


# ---------------------------------------------------------------------------- VGG-16

VGG16_WEIGHTS_ENV = "LT_DIFFUSION_VGG16_WEIGHTS"
VGG16_WEIGHTS_NAME = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1


def vgg16_weights() -> Path:
    return _staged(VGG16_WEIGHTS_ENV, _hub() / "checkpoints" / VGG16_WEIGHTS_NAME)


@feature_space(
    "vgg16", "vgg16", "fc2_relu", 4096,
    "VGG-16 fc2 after ReLU (Kynkäänniemi et al. 2019's precision / recall)",
    _file_check(
        vgg16_weights, "VGG-16",
        "python -c \"import torchvision as tv; tv.models.vgg16(weights='IMAGENET1K_V1')\"",
        VGG16_WEIGHTS_ENV,
    ),
)  # fmt: skip
def _vgg16(device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    path = vgg16_weights()
    info = _weights_info(path, "397923af")
    extractor = _fidelity_extractor(
        FeatureExtractorVGG16, "vgg16", "fc2_relu", path, "torchvision's VGG-16 state dict"
    )
    return extractor.to(device), info


# ---------------------------------------------------------------------------- CLIP

CLIP_WEIGHTS_ENV = "LT_DIFFUSION_CLIP_WEIGHTS"
CLIP_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
CLIP_WEIGHTS_NAME = f"clip-vit-b-32-{CLIP_SHA256}.pt"  # torch-fidelity's name for it


def clip_weights() -> Path:
    return _staged(CLIP_WEIGHTS_ENV, _hub() / "checkpoints" / CLIP_WEIGHTS_NAME)


@feature_space(
    "clip", "clip-vit-b-32", "clip", 512,
    "CLIP ViT-B/32 image embedding (Kynkäänniemi et al. 2023's FD_CLIP)",
    _file_check(
        clip_weights, "CLIP ViT-B/32",
        'python -c "import torch_fidelity.feature_extractor_clip as c; '
        "c.FeatureExtractorCLIP('clip-vit-b-32', ['clip'])\"",
        CLIP_WEIGHTS_ENV,
    ),
)  # fmt: skip
def _clip(device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP

    path = clip_weights()
    info = _weights_info(path)
    if path.name == CLIP_WEIGHTS_NAME and info["weights_sha256"] != CLIP_SHA256:
        raise FeatureWeightsError(
            f"{path} is named like OpenAI's CLIP ViT-B/32 but its SHA-256 differs: the download "
            "is corrupt; fetch it again"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
        extractor = _fidelity_extractor(
            FeatureExtractorCLIP, "clip-vit-b-32", "clip", path, "a CLIP TorchScript archive"
        )
    return extractor.to(device), info


# ---------------------------------------------------------------------------- protocol


def check_space(name: str) -> FeatureSpace:
    if name not in SPACES:
        raise ValueError(f"unknown feature space {name!r}: choose from {sorted(SPACES)}")
    return SPACES[name]


def space_of(extractor_name: str) -> FeatureSpace | None:
    """The space whose torch-fidelity extractor is ``extractor_name`` (None: not registered)."""
    return next((s for s in SPACES.values() if s.extractor == extractor_name), None)


def missing(spaces: Iterable[str]) -> dict[str, str]:
    """``{space: what to stage}`` for the spaces whose weights are not staged."""
    out = {}
    for name in spaces:
        why = check_space(name).missing()
        if why is not None:
            out[name] = why
    return out


def check_staged(uses: Mapping[str, str]) -> None:
    """Refuse (:class:`FeatureWeightsError`) metrics whose feature space is not staged;
    ``uses``: metric -> space. Cheap: nothing is loaded."""
    absent = missing(sorted(set(uses.values())))
    if absent:
        lines = [
            f"{', '.join(m for m, s in uses.items() if s == space)} need {space} features: {why}"
            for space, why in absent.items()
        ]
        raise FeatureWeightsError("; ".join(lines) + "; or leave these metrics out of eval.metrics")


def load(
    name: str, device: str | torch.device = "cpu", **options: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """The extractor of feature space ``name`` on ``device`` and what the record says of it:
    ``space``, ``name`` (torch-fidelity's extractor), ``layer``, ``dim``, ``weights``,
    ``weights_sha256``, ... (refused with the staging instruction when not staged).
    ``options`` go to the space's builder (Inception: ``want_logits``, ``require_logits``)."""
    space = check_space(name)
    why = space.missing()
    if why is not None:
        raise FeatureWeightsError(why)
    extractor, info = space.build(torch.device(device), **options)
    info = {**info, "space": space.name, "name": space.extractor, "layer": space.layer}
    return extractor, {**info, "dim": space.dim, "description": space.description}
