"""Atomic file writes: a temporary file in the same directory, fsync, then ``os.replace``.

A reader (or a crash) therefore sees either the old complete file or the new complete file,
never a half-written one. Everything is serialised *before* the target is touched, so a failing
serialisation leaves an existing file intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

# Temporary files are ".<target name>.<mkstemp's 8 random characters>.tmp".
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(_TMP_SUFFIX))


def _default_mode(path: Path) -> int:
    """Mode for the new file: the old file's, else 0o666 minus the umask (mkstemp uses 0o600,
    which would hide records and caches from the rest of a group on shared clusters)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; it replaces ``path`` only when the
    ``with`` block ends without an exception (otherwise it is removed). Parents are created.

    Use it to stream large outputs (``np.savez(f, ...)``) without holding them in memory.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_mode = _default_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents are created); returns ``path``."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | Path, obj: Any, indent: int | None = 2, allow_nan: bool = True
) -> Path:
    """Serialise ``obj`` first (a failure leaves any old file untouched), then write atomically.

    ``allow_nan=False`` refuses NaN / inf, which strict JSON readers cannot parse.
    """
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically: serialise into memory first, then write."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that writes into ``directory`` killed mid-way left behind
    (each may be as large as the file it was to become); returns them.

    Only call it while no one else can be writing there (e.g. under the run directory's lock):
    a live writer's temporary file looks the same.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if _TMP_NAME.fullmatch(p.name) and p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def remove_temporaries_below(root: str | Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """:func:`remove_temporaries` in ``root`` and every folder below it, except the folders
    of ``root`` named in ``skip``; the same caution applies."""
    root = Path(root)
    removed: list[Path] = []
    for folder, subdirs, _ in os.walk(root):
        if Path(folder) == root:
            subdirs[:] = [d for d in subdirs if d not in skip]
        removed += remove_temporaries(folder)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created, never deleted) for the block: processes of
    one host wait for each other, and the kernel releases it when the holder dies. Filesystems
    without flock get no lock; callers keep what they guard safe without it (atomic writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock
