"""Stand-in feature networks for evaluation tests: the evaluator's feature space registry
(lt_diffusion/evaluation/extractors.py) with a small network in place of a real extractor, so
that a test runs the whole evaluation in seconds (the real extractors are tested on their own)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lt_diffusion.evaluation import extractors as X


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
