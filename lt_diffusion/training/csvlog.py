"""A CSV logger whose ``metrics.csv`` survives resumes (``logger=csv``).

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its directory is not empty, so every
resume of a run with a fixed log directory erased the run's history. This one keeps the rows
of the steps the resumed checkpoint covers, drops the ones a killed run logged after that
checkpoint (the resumed run logs those steps again), keeps one header, and appends.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from lt_diffusion.utils.io import atomic_open


def _write(path: str, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)  # "\r\n" rows, as Lightning writes
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a metrics file; a last line cut short by a kill is left out."""
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    header = list(reader.fieldnames or [])
    rows = [r for r in reader if None not in r.values() and None not in r]
    return header, rows


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step  # read by _check_log_dir_exists, which __init__ calls
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Instead of deleting the file: keep the steps before the checkpoint, adopt the header.
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        header, rows = read_metrics(path)
        kept = [r for r in rows if "step" in r and int(float(r["step"])) < self.resume_step]
        self.metrics_keys = sorted(header)
        _write(path, self.metrics_keys, kept)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # New metric names: rewrite the file under the wider header (atomically).
        _, rows = read_metrics(self.metrics_file_path)
        _write(self.metrics_file_path, fieldnames, rows)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` appending to ``<save_dir>/<name>/<version>/metrics.csv`` across resumes.

    Args:
        resume_step: global step of the checkpoint the run resumes from (0 for a fresh run);
            rows logged at this step or later are dropped, as the run logs them again.
        **kwargs: as for :class:`lightning.pytorch.loggers.CSVLogger`.
    """

    def __init__(self, *args: Any, resume_step: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = int(resume_step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.resume_step)
        return self._experiment
