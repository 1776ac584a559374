"""Shared pieces of the objective tests (tests/test_methods_*.py, test_objective_ddpm.py): a
float64 toy network whose output is a closed form, the objectives' label draw written out, the
linear schedule's abar in float64, and a short training run on fixed toy images."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lt_diffusion.diffusion import NoiseSchedule

T = 1000


class TinyNet(torch.nn.Module):
    """A tiny float64 'network': ``eps = x_t W + b[y] + 1e-3 t (+ aug A)`` on (B, 1, 4, 4)
    images; row 3 of ``b`` is the null label. It records the labels of every call."""

    num_classes = 3
    null_label = 3
    augment_dim = 9

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.randn(9, 4, generator=g, dtype=torch.float64))
        self.seen: list[torch.Tensor] = []

    def formula(self, x, t, y, aug=None):
        out = x @ self.w + self.b[y][:, None, None, :] + 1e-3 * t[:, None, None, None]
        if aug is not None:
            out = out + (aug.double() @ self.a)[:, None, None, :]
        return out

    def forward(self, x, t, y, aug_labels=None):
        self.seen.append(y.clone())
        return self.formula(x, t, y, aug_labels)


def draw_labels(probs: torch.Tensor, n: int) -> torch.Tensor:
    """The objectives' label draw, written out: ``u ~ U[0, 1)``; the label is the number of
    cumulative probabilities <= u (the first class whose cumulative probability exceeds u)."""
    u = torch.rand(n) * probs.sum()
    return (u[:, None] >= torch.cumsum(probs, 0)[None, :]).sum(1)


def abar_of(t: torch.Tensor) -> torch.Tensor:
    """``abar_t`` of Ho et al.'s linear schedule in float64, shaped (B, 1, 1, 1)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[t][:, None, None, None]


PATTERN_COUNTS = [16, 8, 5, 3]


def pattern_images() -> tuple[torch.Tensor, torch.Tensor]:
    """32 fixed 8x8 one-channel images of 4 imbalanced classes (``PATTERN_COUNTS``): one
    smooth pattern per class plus a little noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(PATTERN_COUNTS)])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    patterns = torch.stack([xx, yy, -xx, 2 * xx * yy])
    x0 = (0.8 * patterns[y][:, None] + 0.1 * torch.randn(32, 1, 8, 8, generator=g)).clamp(-1, 1)
    return x0, y


def train_losses(
    objective,
    steps: int = 60,
    *,
    lr: float = 1e-3,
    transform: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    tsa: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train a tiny U-Net (``transform`` applied, TSA at 4x4 with ``tsa``) with ``objective``
    on :func:`pattern_images`, full batch, Adam over the model's and the objective's
    parameters; the loss and every logged term of every step."""
    from lt_diffusion.models.unet import UNet

    x0, y = pattern_images()
    torch.manual_seed(seed)
    model = UNet(
        image_size=8, in_channels=1, ch=32, ch_mult=[1, 2], attn_resolutions=[],
        num_res_blocks=1, dropout=0.0, num_classes=4, tsa_resolutions=[4] if tsa else [],
    )  # fmt: skip
    if transform is not None:
        model = transform(model)
    objective.setup(PATTERN_COUNTS, seed=seed)
    sched = NoiseSchedule(T)
    opt = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=lr)
    series: dict[str, list[float]] = {}
    for _ in range(steps):
        out = objective(model, x0, y, sched)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        for key, value in {"loss": out.loss, **out.terms}.items():
            series.setdefault(key, []).append(float(value.detach()))
    return {key: torch.tensor(values) for key, values in series.items()}


def toy_batch(b: int = 6, seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` float64 (1, 4, 4) images in [-1, 1] for :class:`TinyNet`, labels ``0, 1, ..``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64).clamp(-1, 1)
    return x0, torch.arange(b) % classes


class AlwaysDrop:
    """A host RNG for an objective's batch-level CFG coin that always drops the labels."""

    def random(self) -> float:
        return 0.0
