"""One writer per run directory: an exclusive lock file naming its holder.

Two trainings in one run directory (a user's retry, a SLURM requeue racing the original) would
both write ``last.ckpt`` and the logs. The first one writes ``<run_dir>/train.lock`` holding its
host, process id (with the process start time, so a reused pid is not mistaken for the
holder), SLURM job id and a random token; any other is refused with a message naming the holder.

A lock is taken over, not refused, when its holder is certainly gone:

- it ran on this host and its process no longer exists (killed, crashed, out of memory);
- it belongs to this SLURM job (``SLURM_JOB_ID``): a requeue of the job, unless the holder is
  a live process on this host (two trainings inside one allocation).

The lock appears atomically (a complete temporary file is hard-linked to its name, which fails
when the name exists); the check-and-take-over of a stale lock is serialised among the processes
of one host by ``flock`` on a guard file that is never deleted, so two processes racing for the
same stale lock cannot both win. A holder can lose its lock to a requeue while it still runs (a
node SLURM declared dead): :meth:`RunLock.lost` tells it, and the checkpoint callback stops the
run before it writes anything more.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lt_diffusion.utils.io import exclusive_lock

LOCK_NAME = "train.lock"
GUARD_NAME = ".train.lock.guard"


class RunLockedError(RuntimeError):
    """Another live training holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    # Same pid, other start time: the pid was reused by an unrelated process.
    return start is None or _process_start(pid) in (None, start)


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "token": uuid.uuid4().hex,
    }


def describe_holder(holder: dict[str, Any]) -> str:
    """ "process 123 on host h, SLURM job 45, since <time>": who a lock file names."""
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (
        f"process {holder.get('pid')} on host {holder.get('host')}{job}, "
        f"since {holder.get('since')}"
    )


def _host_guard(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Serialise check-and-take among this host's processes. Filesystems without flock get no
    guard: the link below is still atomic, only two same-host takeovers of one stale lock could
    then race."""
    return exclusive_lock(run_dir / GUARD_NAME)


class RunLock:
    """The exclusive lock of one run directory; use :func:`hold_run_lock` to take it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.me = _identity()
        self.took_over: dict[str, Any] | None = None  # the stale holder replaced, if any

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: refused like a live holder, the message says what to do
        return holder if isinstance(holder, dict) else {}

    def _write_candidate(self) -> Path:
        """This process's lock file, complete, under a temporary name of the atomic writers'
        form (``.train.lock.<8 characters>.tmp``), so that one left by a kill is swept at the
        next start (:func:`lt_diffusion.utils.io.remove_temporaries`)."""
        tmp = self.run_dir / f".{LOCK_NAME}.{self.me['token'][:8]}.tmp"
        tmp.write_text(json.dumps(self.me, indent=1) + "\n")
        return tmp

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return False
        same_host = holder.get("host") == self.me["host"]
        alive = same_host and _pid_alive(int(holder.get("pid", -1)), holder.get("pid_start"))
        if same_host and not alive:
            return True
        job = self.me["slurm_job_id"]
        return job is not None and holder.get("slurm_job_id") == job and not alive

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._write_candidate()
        try:
            with _host_guard(self.run_dir):
                while True:
                    try:
                        os.link(tmp, self.path)  # atomic: fails if any lock exists
                        return
                    except FileExistsError:
                        holder = self._read()
                    except FileNotFoundError:  # swept by the holder's start: write it again
                        tmp = self._write_candidate()
                        continue
                    if holder is None:  # released meanwhile: try again
                        continue
                    if not self._stale(holder):
                        raise RunLockedError(self._refusal(holder))
                    os.replace(tmp, self.path)
                    self.took_over = holder
                    return
        finally:
            tmp.unlink(missing_ok=True)

    def _refusal(self, holder: dict[str, Any]) -> str:
        if not holder:
            return (
                f"{self.path} exists but is not a readable lock. If no training of this run is "
                "running, delete it and start again."
            )
        return (
            f"Another training is writing to {self.run_dir}: {describe_holder(holder)} "
            f"(lock file {self.path}). Two trainings in one run directory would overwrite each "
            "other's checkpoints and logs. Wait for it to finish or stop it, or give this run "
            "its own directory (tag=..., seed=... or run_name=...). If that process no longer "
            f"runs (its host went down), delete {self.path} and start again."
        )

    def lost(self) -> str | None:
        """None while this process still holds the lock, else why it does not."""
        holder = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            return None
        if not holder:
            return f"its lock file {self.path} was removed"
        return f"{describe_holder(holder)} took over its lock file {self.path}"

    def release(self) -> None:
        """Remove the lock file if it is still this process's."""
        with _host_guard(self.run_dir):
            if self.lost() is None:
                self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold the run directory's lock for the ``with`` block (released on exceptions too).

    ``enabled=False`` (the ranks other than 0 of a distributed run) yields None and takes
    nothing: rank 0 writes for all of them.
    """
    if not enabled:
        yield None
        return
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
