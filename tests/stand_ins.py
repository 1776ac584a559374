"""Stand-in feature networks for evaluation tests: the evaluator's feature space registry
(lt_diffusion/evaluation/extractors.py) with a small network in place of a real extractor, so
that a test runs the whole evaluation in seconds (the real extractors are tested on their own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lt_diffusion.evaluation import extractors as X


class PooledPixels(nn.Module):
    """A stand-in Inception: 4x4-pooled pixels (48 features) under Inception's layer name."""

    features_list = ("2048",)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1),)


def stand_in_space(
    monkeypatch: pytest.MonkeyPatch,
    module: nn.Module,
    dim: int,
    name: str = "stand-in",
    space: str = "inception",
) -> X.FeatureSpace:
    """Register ``module`` (a torch-fidelity-like extractor: ``features_list`` and a forward
    returning a tuple) as feature space ``space`` for the test, with ``dim`` features, no
    logits and no weights to stage."""
    old = X.SPACES[space]

    def build(device: torch.device, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
        info = {
            "weights": f"{name} (test stand-in)",
            "weights_sha256": "0" * 64,
            "has_logits": False,
            "is_unavailable": f"no logits layer in the test's stand-in extractor ({name})",
        }
        return module.to(device), info

    replaced = X.FeatureSpace(space, old.extractor, old.layer, dim, f"{name} (test)", build)
    monkeypatch.setitem(X.SPACES, space, replaced)
    return replaced


# A torch hub code folder of the DINOv2 repository's shape: hubconf.py defines dinov2_vitl14,
# here a small random network with ViT-L/14's output (1024 features of a 224 px image).
DINOV2_HUBCONF = """
import torch
from torch import nn

dependencies = ["torch"]


def dinov2_vitl14(*, pretrained=True, **kwargs):
    net = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=14, stride=14),  # ViT-L/14's patch size
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 1024),
    )
    if pretrained:
        raise RuntimeError("the stand-in has no download")
    return net
"""


def stage_small_dinov2(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Stage a small random network in DINOv2's hub layout under ``root`` (the code folder and
    a weights file, named through the staging variables); returns ``(code, weights)``."""
    repo = root / X.DINOV2_REPO_NAME
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(DINOV2_HUBCONF)
    net = torch.hub.load(str(repo), "dinov2_vitl14", source="local", pretrained=False)
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p, std=0.2)
    weights = root / X.DINOV2_WEIGHTS_NAME
    torch.save(net.state_dict(), weights)
    monkeypatch.setenv(X.DINOV2_REPO_ENV, str(repo))
    monkeypatch.setenv(X.DINOV2_WEIGHTS_ENV, str(weights))
    return repo, weights


def stage_small_clip(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CLIP TorchScript archive of OpenAI's layout, small (one 64-wide layer, 32 px, 16 px
    patches) with ViT-B/32's 512-d embedding, staged through the variable; returns its path."""
    import warnings

    from torch_fidelity.feature_extractor_clip import CLIPVisual

    torch.manual_seed(0)
    visual = CLIPVisual(512, 32, 1, 64, 16)

    class Archive(nn.Module):  # the keys build_model reads: visual.* and text_projection
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual.visual
            self.text_projection = nn.Parameter(torch.randn(8, 512))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    path = root / "clip-small.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.trace(Archive(), torch.randn(1, 3, 32, 32)), str(path))
    monkeypatch.setenv(X.CLIP_WEIGHTS_ENV, str(path))
    return path


def no_staged_weights(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub folder and no staging variables: nothing but Inception is staged."""
    for env in (X.DINOV2_REPO_ENV, X.DINOV2_WEIGHTS_ENV, X.VGG16_WEIGHTS_ENV, X.CLIP_WEIGHTS_ENV):
        monkeypatch.delenv(env, raising=False)
    hub = root / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub
