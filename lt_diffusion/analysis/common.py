"""Pieces every analysis shares: rebuilding a run from its checkpoint the way evaluation does,
the fixed per-class draws of ``(t, noise)``, settings validation, and the record files.

Fixed draws: image ``i`` of the training set (its position in the long-tailed subset) gets its
own generator, seeded from ``(seed, i)``, for its ``t`` and noise. The draws therefore do not
depend on the batch size, the device, the order classes are visited in, or which other images
were selected, and two models (raw and pruned) see exactly the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from lt_diffusion.data.datamodule import stream_seed
from lt_diffusion.data.splits import SPLITS
from lt_diffusion.runs.load import LoadedRun, load_run

# Random streams derived from the analysis seed (see lt_diffusion.data.datamodule.stream_seed).
_SELECT, _DRAW = 101, 102
RECORD_KIND = "analysis"
RECORD_SCHEMA = 1

S = TypeVar("S")


# ----------------------------------------------------------------------------------------------
# Settings


def settings_from_config(cls: type[S], cfg: Mapping[str, Any] | DictConfig) -> S:
    """Build a settings dataclass from an ``analysis`` config node (its ``name`` dropped), with
    a clear error for keys the analysis does not know."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data.pop("name", None)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for this analysis: it takes {known} "
            "(check configs/analysis/*.yaml and your overrides)"
        )
    return cls(**data)


def check_sampling(images_per_class: int | None, draws: int) -> None:
    """``images_per_class`` is null (every image) or >= 1; ``draws`` >= 1."""
    if images_per_class is not None and int(images_per_class) < 1:
        raise ValueError(
            f"images_per_class must be >= 1 or null (every training image), got {images_per_class}"
        )
    if int(draws) < 1:
        raise ValueError(f"draws (noise draws per image) must be >= 1, got {draws}")


def check_timestep(t: int | None, num_timesteps: int, what: str = "t") -> int:
    """The timestep to use: ``t``, or ``T - 1`` (pure noise) when ``t`` is null."""
    if t is None:
        return num_timesteps - 1
    if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < num_timesteps:
        raise ValueError(
            f"{what}={t!r} is not a timestep of this run's diffusion: use an integer in "
            f"[0, {num_timesteps - 1}] (T = {num_timesteps}), or null for T - 1"
        )
    return int(t)


# ----------------------------------------------------------------------------------------------
# Fixed per-class draws


@dataclass
class ClassBatch:
    """One batch of a class's fixed draws: ``x_t = q_sample(x0, t, noise)``."""

    x0: Tensor  # (B, C, H, W) in [-1, 1], or points (B, D)
    t: Tensor  # (B,) int64
    noise: Tensor  # (B, C, H, W)
    y: Tensor  # (B,) int64, the class
    index: Tensor  # (B,) position of each sample's image in the training set


class ClassSamples:
    """The training images of each class with fixed draws of ``(t, noise)``.

    Args:
        images: uint8 ``(N, C, H, W)`` training images (the long-tailed subset), or float
            ``(N, D)`` training points (vector data).
        labels: int64 ``(N,)`` labels (class 0 the most frequent).
        num_classes: number of classes.
        images_per_class: at most this many images of a class (a seeded random subset); None
            takes every image.
        draws: draws of ``(t, noise)`` per image.
        seed: the seed of the subset choice and of the draws.
        num_timesteps: T; ``t`` is drawn uniformly from ``0..T-1`` unless ``t`` is given.
        t: a fixed timestep for every sample, or None.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        images_per_class: int | None,
        draws: int,
        seed: int,
        num_timesteps: int,
        t: int | None = None,
    ) -> None:
        check_sampling(images_per_class, draws)
        is_image = images.dtype == torch.uint8 and images.ndim == 4
        is_points = images.is_floating_point() and images.ndim == 2
        if not (is_image or is_points) or len(images) != len(labels):
            raise ValueError(
                f"ClassSamples needs uint8 images (N, C, H, W) or float points (N, D) and N "
                f"labels, got {images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images, self.labels = images.cpu(), labels.cpu().long()
        self.num_classes, self.draws, self.seed = int(num_classes), int(draws), int(seed)
        self.images_per_class = None if images_per_class is None else int(images_per_class)
        self.num_timesteps = int(num_timesteps)
        self.t = None if t is None else check_timestep(t, self.num_timesteps)
        self._chosen: dict[int, Tensor] = {}

    def indices(self, c: int) -> Tensor:
        """Positions of the chosen images of class ``c`` (sorted)."""
        if c not in self._chosen:
            members = torch.nonzero(self.labels == c).flatten()
            n = self.images_per_class
            if n is not None and len(members) > n:
                g = torch.Generator().manual_seed(stream_seed(self.seed, _SELECT, c))
                members = members[torch.randperm(len(members), generator=g)[:n]].sort().values
            self._chosen[c] = members
        return self._chosen[c]

    def count(self, c: int) -> int:
        """Number of samples (images x draws) of class ``c``."""
        return len(self.indices(c)) * self.draws

    def _draw(self, index: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(stream_seed(self.seed, _DRAW, index))
        t = torch.randint(0, self.num_timesteps, (self.draws,), generator=g)
        if self.t is not None:
            t = torch.full_like(t, self.t)
        noise = torch.randn((self.draws, *self.images.shape[1:]), generator=g)
        return t, noise

    def batches(
        self,
        c: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[ClassBatch]:
        """Class ``c``'s samples in batches of about ``batch_size`` (whole images' draws)."""
        idx = self.indices(c)
        per_batch = max(1, int(batch_size) // self.draws)
        for start in range(0, len(idx), per_batch):
            part = idx[start : start + per_batch]
            draws = [self._draw(int(i)) for i in part]
            t = torch.cat([d[0] for d in draws])
            noise = torch.cat([d[1] for d in draws])
            x0 = self.images[part].float()
            if self.images.dtype == torch.uint8:  # images to [-1, 1]; points as they are
                x0 = x0.div_(127.5).sub_(1.0)
            x0 = x0.repeat_interleave(self.draws, dim=0)
            yield ClassBatch(
                x0=x0.to(device=device, dtype=dtype),
                t=t.to(device),
                noise=noise.to(device=device, dtype=dtype),
                y=torch.full((len(t),), c, dtype=torch.long, device=device),
                index=part.repeat_interleave(self.draws).to(device),
            )


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """cuDNN in deterministic mode inside the block, so repeated forwards of the same inputs
    agree exactly (the raw / pruned comparison relies on it); restored afterwards."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def progress(items: Iterable[S], desc: str, enabled: bool = True, total: int | None = None):
    """``items`` wrapped in a tqdm progress bar (on stderr) when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Per-class summaries


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float when finite, else None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def split_means(values: Sequence[float | None], splits: Sequence[str]) -> dict[str, float | None]:
    """Mean of the defined per-class values of each split (None where a split has none)."""
    out: dict[str, float | None] = {}
    for s in SPLITS:
        vals = [v for v, sp in zip(values, splits) if sp == s and v is not None]
        out[s] = finite_or_none(sum(vals) / len(vals)) if vals else None
    return out


def rank_correlation(values: Sequence[float | None], counts: Sequence[int]) -> float | None:
    """Spearman's rank correlation between the defined per-class values and the class counts
    (None with fewer than 3 defined values or a constant side)."""
    from scipy.stats import spearmanr

    pairs = [(v, n) for v, n in zip(values, counts) if v is not None]
    if len(pairs) < 3:
        return None
    a, b = zip(*pairs)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return finite_or_none(spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------------------------
# A run rebuilt from its checkpoint


@dataclass
class AnalysedRun:
    """A run rebuilt from its checkpoint (:func:`lt_diffusion.runs.load.load_run`)
    with its long-tailed training set, as the analyses use it."""

    run: LoadedRun
    datamodule: Any
    info: dict[str, Any]
    data_root: str | None = None  # where a text-to-image run's data are, when read later

    def training_data(self) -> Any:
        """The run's long-tailed datamodule (built now for a text-to-image run, whose analyses
        load it only when they read training images)."""
        if self.datamodule is None:
            self.datamodule = self.run.datamodule(self.data_root)
        return self.datamodule

    def __getattr__(self, name: str) -> Any:  # model, meta, schedule, device, run_dir, ...
        if name.startswith("__") or name == "run":  # copy / pickle probe a bare instance
            raise AttributeError(name)
        return getattr(self.run, name)

    def samples(
        self, images_per_class: int | None, draws: int, seed: int, t: int | None = None
    ) -> ClassSamples:
        """The fixed per-class draws on this run's long-tailed training set."""
        dm = self.datamodule
        return ClassSamples(
            dm.train_images,
            dm.train_labels,
            int(self.info["num_classes"]),
            images_per_class,
            draws,
            seed,
            self.run.schedule.num_timesteps,
            t,
        )


def load_analysed_run(
    checkpoint: str | Path,
    device: str | torch.device = "auto",
    ema: bool = True,
    data_root: str | None = None,
    theta_g_only: bool = False,
    text_to_image: bool = False,
) -> AnalysedRun:
    """The checkpoint's run with its training set (optionally under another data root);
    pixel-space backbones only (the analyses noise training *pixels*).

    ``text_to_image``: the run of a text-conditioned backbone instead (Stable Diffusion: the
    concept analysis samples from prompts and reads no training image), without its data (the
    dataset description, class counts and names included, comes from the checkpoint; an
    analysis that reads training images builds them with :meth:`AnalysedRun.training_data`)."""
    run = load_run(checkpoint, device, ema=ema, theta_g_only=theta_g_only)
    if text_to_image:
        if not (hasattr(run.model, "encode_prompts") and hasattr(run.model, "unet")):
            raise ValueError(
                f"{checkpoint} is not a text-to-image model ({run.train_cfg.model.get('_target_')}"
                "): this analysis needs a Stable Diffusion backbone (model=sd_lora)"
            )
        return AnalysedRun(run, None, dict(run.meta["dataset"]), data_root)
    if getattr(run.model, "latent_shape", None) is not None:
        raise ValueError(
            f"{checkpoint} is a latent-diffusion model ({run.train_cfg.model.get('_target_')}): "
            "the analyses run on pixel-space backbones (model=unet_*) only"
        )
    datamodule = run.datamodule(data_root)
    return AnalysedRun(run, datamodule, datamodule.info())


# ----------------------------------------------------------------------------------------------
# Records


def record_paths(
    run_dir: Path, name: str, theta_g_only: bool = False, out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """``(<out_dir>/<name>[-theta_g].json, ... .png)``; ``out_dir`` defaults to
    ``<run_dir>/analyses``."""
    folder = Path(out_dir) if out_dir else run_dir / "analyses"
    stem = name + ("-theta_g" if theta_g_only else "")
    return folder / f"{stem}.json", folder / f"{stem}.png"


def build_analysis_record(
    name: str, settings: Any, run: AnalysedRun, results: dict[str, Any], code_version: str
) -> dict[str, Any]:
    """One analysis record: what was analysed (checkpoint, step, config, dataset with its
    per-class counts and split map), with which settings, and the results."""
    settings_dict = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
    return {
        "schema": RECORD_SCHEMA,
        "kind": RECORD_KIND,
        "analysis": name,
        "code_version": code_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings_dict,
        "checkpoint": {
            "path": run.meta["checkpoint"],
            "step": int(run.meta["global_step"]),
            "ema": run.ema,
            "theta_g_only": run.theta_g_only,
        },
        "config": OmegaConf.to_container(run.train_cfg, resolve=True),
        "dataset": run.info,
        "diffusion": {"num_timesteps": run.schedule.num_timesteps},
        "results": results,
    }
