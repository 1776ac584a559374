"""Reference statistics as ``.npz`` files, in the format pytorch-fid, EDM and the CBDM / OC code
read: ``mu`` (D,) and ``sigma`` (D, D) of the whole set (they load ``np.load(f)["mu"]``,
``["sigma"]`` and ignore the rest), and beside them what this project adds:

===========================================  ==================================================
key                                          holds
===========================================  ==================================================
``mu``, ``sigma``, ``count``                 the whole set: mean, covariance (float64, N - 1),
                                             number of images
``mu_<part>``, ``sigma_<part>``,             each split (``many``, ``medium``, ``few``) and
``count_<part>``                             each class (``class_003``)
``extractor``, ``layer``, ``weights_sha256``  torch-fidelity's extractor, its layer, its weights
``description``                              which images, in words
===========================================  ==================================================

:func:`read_stats` validates a file whoever wrote it: every ``mu`` / ``sigma`` pair has shapes
(D,) and (D, D) with one D, ``sigma`` is finite and symmetric; :func:`check_space` then refuses a
file of another extractor or dimension than the metric's. Files from pytorch-fid or the CBDM
code have no ``count`` or ``extractor``: their dimension must match, and the record says what
the file did not.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lt_diffusion.evaluation.inception import sha256
from lt_diffusion.evaluation.metrics import Statistics
from lt_diffusion.utils.io import atomic_open

OVERALL = "overall"
_PART = re.compile(r"^(?:many|medium|few|class_\d{3,})$")


class StatsFileError(ValueError):
    """A statistics file is unreadable, malformed, or of another feature space."""


@dataclass(frozen=True)
class StatsFile:
    """A validated statistics file: its parts (``overall``, ``many``, ``class_003``, ...) and
    what it says of itself (None where it does not)."""

    path: Path
    sha256: str
    parts: dict[str, Statistics]
    extractor: str | None = None
    layer: str | None = None
    weights_sha256: str | None = None
    description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return len(self.parts[OVERALL].mu)

    def origin(self, parts: list[str]) -> dict[str, Any]:
        """What a record states of this reference, ``parts`` the ones it compared against."""
        return {
            "origin": "file",
            "path": str(self.path),
            "sha256": self.sha256,
            "extractor": self.extractor,
            "layer": self.layer,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "description": self.description
            or "a statistics file that does not describe its images",
            "parts": parts,
            "counts": {p: self.parts[p].n for p in parts},
        }


def _key(name: str, part: str) -> str:
    return name if part == OVERALL else f"{name}_{part}"


def write_stats(
    path: str | Path,
    parts: Mapping[str, Statistics],
    *,
    extractor: str,
    layer: str,
    weights_sha256: str,
    description: str,
) -> Path:
    """Write ``parts`` (``overall`` required) atomically to ``path`` (an ``.npz``); an existing
    file is replaced only when the new one is complete."""
    if OVERALL not in parts:
        raise ValueError("a statistics file needs the overall part (pytorch-fid's mu / sigma)")
    arrays: dict[str, np.ndarray] = {}
    for part, stats in parts.items():
        if part != OVERALL and not _PART.match(part):
            raise ValueError(f"part {part!r} is not overall, a split or class_<index>")
        arrays[_key("mu", part)] = np.asarray(stats.mu, dtype=np.float64)
        arrays[_key("sigma", part)] = np.asarray(stats.sigma, dtype=np.float64)
        arrays[_key("count", part)] = np.array(int(stats.n), dtype=np.int64)
    meta = {
        "extractor": extractor,
        "layer": layer,
        "weights_sha256": weights_sha256,
        "description": description,
    }
    arrays.update({k: np.array(str(v)) for k, v in meta.items()})
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: a statistics file is an .npz")
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _check(path: Path, part: str, mu: Any, sigma: Any) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    where = f"{path} ({_key('mu', part)}, {_key('sigma', part)})"
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise StatsFileError(
            f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsFileError(f"{where}: mu or sigma holds NaN or inf")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-5 * scale:
        raise StatsFileError(f"{where}: sigma is not symmetric, so it is no covariance")
    return mu, sigma


def _text(f: Any, key: str) -> str | None:
    return str(f[key]) if key in f.files else None


@functools.lru_cache(maxsize=8)
def _read(path: Path, _stamp: tuple[int, int]) -> StatsFile:
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as err:  # not a zip / npy of any kind
        raise StatsFileError(f"{path} is not a readable .npz statistics file ({err})") from err
    with f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise StatsFileError(
                f"{path} has no mu / sigma (keys: {sorted(f.files)}): not a pytorch-fid / EDM / "
                "CBDM statistics file"
            )
        names = {OVERALL} | {k[3:] for k in f.files if k.startswith("mu_")}
        parts: dict[str, Statistics] = {}
        for part in sorted(names):
            if _key("sigma", part) not in f.files:
                raise StatsFileError(f"{path} has {_key('mu', part)} without its sigma")
            mu, sigma = _check(path, part, f[_key("mu", part)], f[_key("sigma", part)])
            count = _key("count", part)
            parts[part] = Statistics(mu, sigma, int(f[count]) if count in f.files else None)
        dims = {p: len(s.mu) for p, s in parts.items()}
        if len(set(dims.values())) > 1:
            raise StatsFileError(f"{path}: its parts have different dimensions {dims}")
        return StatsFile(
            path,
            sha256(path),
            parts,
            _text(f, "extractor"),
            _text(f, "layer"),
            _text(f, "weights_sha256"),
            _text(f, "description"),
        )


def read_stats(path: str | Path) -> StatsFile:
    """Read and validate a statistics file (cached while the file is unchanged)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise StatsFileError(f"statistics file {path} does not exist")
    st = os.stat(path)
    return _read(path, (st.st_mtime_ns, st.st_size))


def check_space(stats: StatsFile, extractor: str, dim: int, metric: str) -> None:
    """Refuse a file of another extractor or dimension than ``metric``'s feature space."""
    if stats.extractor is not None and stats.extractor != extractor:
        raise StatsFileError(
            f"{stats.path} holds {stats.extractor} statistics; {metric} is computed on {extractor} "
            "features"
        )
    if stats.dim != dim:
        raise StatsFileError(
            f"{stats.path} holds {stats.dim}-dimensional statistics; {metric} is computed on "
            f"{extractor} features, which have {dim} dimensions (another extractor's file?)"
        )
