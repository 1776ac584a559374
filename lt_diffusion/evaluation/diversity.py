"""Diversity metrics of generated images: density and coverage (Naeem et al. 2020), the Vendi
score (Friedman & Dieng 2023), both on Inception features, and intra-class LPIPS diversity
(Zhang et al. 2018, the ``lpips`` package) on the images themselves. Registered in
:mod:`lt_diffusion.evaluation.metrics`; docs/evaluation.md says what each one means.

LPIPS runs offline: its linear layers ship inside the ``lpips`` package, its AlexNet trunk is
torchvision's ImageNet file, which the user stages like the Inception weights
(:func:`alexnet_weights`); nothing is downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lt_diffusion.evaluation.inception import sha256
from lt_diffusion.records.metrics import feature_matrix, need, same_dim
from lt_diffusion.utils.cache import staged_weights

ALEXNET_WEIGHTS_NAME = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet IMAGENET1K_V1
ALEXNET_SHA256_PREFIX = "7be5be79"  # torch hub convention: the name carries the hash prefix
LPIPS_WEIGHTS_ENV = "LT_DIFFUSION_LPIPS_WEIGHTS"
LPIPS_VERSION = "0.1"


class LPIPSWeightsError(RuntimeError):
    """The AlexNet weights LPIPS needs are missing, corrupt or not AlexNet's."""


# ---------------------------------------------------------------------------- density, coverage


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (float64; clamped at 0 against rounding)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def density_coverage(
    real: Any,
    fake: Any,
    k: int = 5,
    device: str | torch.device = "cpu",
    memory_budget: int = 2**26,
) -> tuple[float, float]:
    """Density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics for
    Generative Models", ICML, Eqs. 3 and 4) on the k-NN balls of the **real** features:
    ``r_i`` = distance of real ``X_i`` to its k-th nearest other real sample,

        density  = 1 / (k M) * sum_j sum_i 1[||Y_j - X_i|| < r_i]
        coverage = 1 / N     * sum_i 1[exists j: ||Y_j - X_i|| < r_i]

    (``M`` generated ``Y``, ``N`` real ``X``; strict ``<`` as the authors' ``prdc`` code).
    Float64; distance blocks of at most ``memory_budget`` entries. Needs more than ``k`` real
    images and at least one generated.
    """
    r, f = feature_matrix(real, "real"), feature_matrix(fake, "fake")
    same_dim(r, f)
    if k < 1:
        raise ValueError(f"density/coverage neighbourhood k must be >= 1, got {k}")
    need(len(r), k + 1, f"density/coverage with k={k} (real)")
    need(len(f), 1, "density/coverage (generated)")
    x = torch.from_numpy(r).to(device)
    y = torch.from_numpy(f).to(device)
    rows = max(1, memory_budget // len(x))
    # k + 1: each real sample is its own nearest neighbour at distance 0.
    radii = torch.cat(
        [_sq_dist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(rows)]
    )  # squared radii; comparing squares keeps the order
    inside = torch.zeros((), dtype=torch.float64, device=x.device)
    covered = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for b in y.split(rows):
        hit = _sq_dist(b, x) < radii[None, :]
        inside += hit.sum()
        covered |= hit.any(0)
    return float(inside) / (k * len(y)), float(covered.double().mean())


# ---------------------------------------------------------------------------- Vendi score


def vendi_score(features: Any) -> float:
    """The Vendi score (Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric
    for Machine Learning", TMLR, Def. 3.1) with the cosine-similarity kernel:
    ``exp(-sum_i l_i log l_i)``, ``l_i`` the eigenvalues of ``K / n``, ``K_ij = cos(x_i, x_j)``.
    1 for n identical samples, n for n orthogonal ones: the effective number of distinct
    samples. ``K / n = X X^T / n`` (rows of ``X`` unit length) shares its non-zero eigenvalues
    with ``X^T X / n``, so the smaller of the two is decomposed (float64)."""
    x = feature_matrix(features, "features")
    if len(x) < 1:
        raise ValueError("the Vendi score needs at least one sample")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ValueError("the Vendi score's cosine kernel is undefined for an all-zero feature")
    x = x / norms
    n, d = x.shape
    gram = x @ x.T if n <= d else x.T @ x
    lam = np.linalg.eigvalsh(gram / n)
    lam = lam[lam > 0]  # rounding leaves tiny negatives; 0 log 0 = 0
    return float(np.exp(-np.sum(lam * np.log(lam))))


# ---------------------------------------------------------------------------- LPIPS


def how_to_get_lpips() -> str:
    """What a user does to make LPIPS available."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"download {ALEXNET_WEIGHTS_NAME} (torchvision's AlexNet ImageNet weights, "
        f"https://download.pytorch.org/models/{ALEXNET_WEIGHTS_NAME}) on a machine with network "
        f"access and copy it to {hub}/ or set {LPIPS_WEIGHTS_ENV}=/path/to/it; or drop "
        "lpips_diversity from the protocol's metrics (eval.metrics)"
    )


def alexnet_weights() -> Path:
    """The staged AlexNet file: ``$LT_DIFFUSION_LPIPS_WEIGHTS``, else torch hub's
    ``checkpoints/`` directory; :class:`LPIPSWeightsError` saying how to stage it otherwise."""
    path = staged_weights(LPIPS_WEIGHTS_ENV, ALEXNET_WEIGHTS_NAME, LPIPSWeightsError)
    if path is None:
        raise LPIPSWeightsError(
            f"lpips_diversity needs the AlexNet weights LPIPS is built on, and none are staged. "
            f"To get them: {how_to_get_lpips()}"
        )
    return path


def _trunk_state(state: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """torchvision AlexNet ``features.<i>.*`` keys under the lpips trunk's ``slice<s>.<i>.*``
    (lpips keeps torchvision's layer indices inside its five slices)."""
    where = {}
    for name, _ in net.named_parameters():
        _, index, param = name.split(".")  # slice<s>.<i>.<weight|bias>
        where[f"features.{index}.{param}"] = name
    missing = sorted(set(where) - set(state))
    if missing:
        raise LPIPSWeightsError(
            f"the AlexNet file lacks {missing}: it is not torchvision's AlexNet state dict"
        )
    return {where[k]: state[k] for k in where}


def load_lpips(
    device: str | torch.device = "cpu", weights_path: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """LPIPS v0.1 on AlexNet (the ``lpips`` package's ``LPIPS(net="alex")``), built without
    network access: the trunk from ``weights_path`` or :func:`alexnet_weights`, the linear
    layers from the package. Returns ``(model, info)``; info names the files and their SHA-256.
    """
    path = Path(weights_path).expanduser() if weights_path else alexnet_weights()
    if not path.is_file():
        raise LPIPSWeightsError(f"AlexNet weights file {path} does not exist")
    digest = sha256(path)
    if path.name == ALEXNET_WEIGHTS_NAME and not digest.startswith(ALEXNET_SHA256_PREFIX):
        raise LPIPSWeightsError(
            f"{path} is named like torchvision's AlexNet weights but its SHA-256 does not start "
            f"with {ALEXNET_SHA256_PREFIX}: the download is corrupt; fetch it again"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling / zip error means the same thing here
        raise LPIPSWeightsError(f"{path} is not a readable torch weights file ({err})") from err
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about `pretrained=False`
        model = lpips.LPIPS(net="alex", version=LPIPS_VERSION, pnet_rand=True, verbose=False)
    model.net.load_state_dict(_trunk_state(state, model.net), strict=True)
    lin = Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / "alex.pth"
    info = {
        "net": "alex",
        "version": LPIPS_VERSION,
        "trunk_weights": path.name,
        "trunk_weights_sha256": digest,
        "linear_weights_sha256": sha256(lin),
    }
    return model.eval().to(device), info


def _layer_weights(model: nn.Module) -> list[Tensor]:
    """The channel weights of each linear layer (1x1 convolution, no bias); LPIPS trains them
    clamped to >= 0, which :func:`lpips_embeddings` relies on."""
    out = [lin.model[-1].weight.detach().flatten() for lin in model.lins]
    if any(bool((w < 0).any()) for w in out):
        raise ValueError("LPIPS linear weights must be >= 0 (as trained); these are not")
    return out


def _lpips_input(images: Tensor, size: int | None) -> Tensor:
    """uint8 (N, 1 or 3, H, W) as LPIPS takes them: float in [-1, 1], three channels,
    bilinearly resized to ``size`` when given."""
    x = images.float() / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


@torch.inference_mode()
def lpips_embeddings(
    images: Tensor,
    model: nn.Module,
    size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Per-image vectors ``e`` with ``LPIPS(a, b) = ||e(a) - e(b)||^2`` (float64).

    LPIPS (Zhang et al. 2018, Eq. 1, as the ``lpips`` package computes it) is
    ``sum_l 1/(H_l W_l) sum_hw sum_c w_lc (f_l(a) - f_l(b))_hwc^2`` over the trunk's
    channel-normalised activations ``f_l``, ``w_l`` the package's 1x1 convolution (the square of
    the paper's ``w_l``, hence >= 0). That is the squared distance of
    ``e = concat_l sqrt(w_l / (H_l W_l)) * f_l``: one trunk pass per image serves every pair.
    """
    import lpips

    device = torch.device(device) if device is not None else next(model.parameters()).device
    scales = [w.to(device).sqrt()[None, :, None, None] for w in _layer_weights(model)]
    out = []
    for batch in images.split(batch_size):
        x = _lpips_input(batch.to(device), size)
        feats = model.net(model.scaling_layer(x))
        parts = [
            (lpips.normalize_tensor(f) * s / (f.shape[2] * f.shape[3]) ** 0.5).flatten(1)
            for f, s in zip(feats, scales)
        ]
        out.append(torch.cat(parts, 1).double().cpu())
    return torch.cat(out).numpy()


def mean_pairwise_sq_distance(e: np.ndarray) -> float:
    """Mean of ``||e_i - e_j||^2`` over the ``n (n - 1) / 2`` unordered pairs, without forming
    them: ``sum_{i<j} ||e_i - e_j||^2 = n sum_i ||e_i - mean||^2``."""
    n = len(e)
    if n < 2:
        raise ValueError(f"a mean over pairs needs at least 2 samples, got {n}")
    centred = e - e.mean(axis=0)
    return float(2.0 * np.einsum("ij,ij->", centred, centred) / (n - 1))


def lpips_diversity(images: Tensor, model: nn.Module, **embedding: Any) -> float:
    """Mean LPIPS distance over all pairs of ``images`` (uint8, one class): the intra-class
    LPIPS diversity; 0 when every image is the same, higher is more diverse. ``embedding``:
    :func:`lpips_embeddings`' ``size``, ``batch_size``, ``device``."""
    return mean_pairwise_sq_distance(lpips_embeddings(images, model, **embedding))


def check_lpips_size(model: nn.Module, channels: int, image_size: int, size: int | None) -> None:
    """Refuse, before any generation, images too small for LPIPS's AlexNet (it pools to 1x1
    by 31 px; Fashion-MNIST's 28 px fail), naming the setting that resizes them."""
    device = next(model.parameters()).device
    probe = torch.zeros(1, channels, image_size, image_size, dtype=torch.uint8, device=device)
    try:
        with torch.inference_mode():
            model.net(model.scaling_layer(_lpips_input(probe, size)))
    except RuntimeError as err:
        raise ValueError(
            f"images of {size or image_size} px are too small for LPIPS's AlexNet ({err}): set "
            "eval.lpips_size=64 (bilinear upsampling before LPIPS)"
        ) from None
