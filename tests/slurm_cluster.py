"""A real one-node SLURM cluster for tests (Debian's slurm-wlm and munge), private to a folder.

Everything lives under that folder: the munge key and socket, slurm.conf (clients find it via
``SLURM_CONF``), spool, state and logs, on ports picked free. The daemons run in the foreground
as child processes, so they are stopped by their process ids, and nothing outside the folder is
touched. Needs root (slurmd launches jobs as their user) and the packages ``slurmctld slurmd
slurm-client munge``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here, or ``None`` when it can."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "apt-get install slurmctld slurmd slurm-client munge (as .ci/run does)"
        )
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


class LocalSlurm:
    """Start with :meth:`start`, submit with the usual commands under :attr:`env`, then
    :meth:`stop`."""

    def __init__(self, base: Path, cpus: int | None = None) -> None:
        self.base = Path(base)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = self.base / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        b = self.base
        munge = b / "munge"
        for d in (munge, b / "spool" / "ctld", b / "spool" / "d", b / "log"):
            d.mkdir(parents=True, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        munge.chmod(0o711)
        key.chmod(0o400)
        settings = {
            "ClusterName": "lttest",
            "SlurmctldHost": self.host,
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={munge / 'munge.socket'}",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": b / "spool" / "ctld",
            "SlurmdSpoolDir": b / "spool" / "d",
            "SlurmctldPidFile": b / "slurmctld.pid",
            "SlurmdPidFile": b / "slurmd.pid",
            "SlurmctldLogFile": b / "log" / "slurmctld.log",
            "SlurmdLogFile": b / "log" / "slurmd.log",
            "SwitchType": "switch/none",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "SchedulerType": "sched/backfill",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "JobCompType": "jobcomp/none",
            "AccountingStorageType": "accounting_storage/none",
            # A requeued or cancelled job gets SIGKILL 5 s after SIGTERM (default 30 s).
            "KillWait": 5,
            "MinJobAge": 600,
        }
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines.append(f"NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, args: list[str], user: str | None = None) -> None:
        cmd = [_exe(name), *args]
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        log = open(self.base / "log" / f"{name}.out", "wb")  # noqa: SIM115 - kept for the process
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 30.0) -> LocalSlurm:
        self._write_config()
        m = self.base / "munge"
        self._spawn(
            "munged",
            ["-F", "--force", f"--key-file={m / 'munge.key'}", f"--socket={m / 'munge.socket'}",
             f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
             f"--seed-file={m / 'munged.seed'}"],
            user="munge",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (m / "munge.socket").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: see {self.base / 'log'}")
            time.sleep(0.1)
        self._spawn("slurmctld", ["-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["-D", "-f", str(self.conf)])
        while True:
            self._check_alive()
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True
            )
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the SLURM node did not become idle (sinfo: {out.stdout or out.stderr!r}); "
                    f"logs in {self.base / 'log'}"
                )
            time.sleep(0.3)

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(
                    f"{p.args[0] if p.args else 'daemon'} exited with code {p.returncode}: "
                    f"logs in {self.base / 'log'}"
                )

    def run(self, *cmd: str) -> str:
        """A SLURM client command against this cluster; its stdout."""
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=True)
        return out.stdout

    def stop(self) -> None:
        """Stop the daemons we started, by process id (jobs still running are cancelled first)."""
        # slurmd waits for running job steps before it exits: cancel them and let them end.
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
