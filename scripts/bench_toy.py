"""Time the synthetic benchmark's whole table from nothing (every run trained and evaluated),
through the command users run, then draw its points plot:

    .venv/bin/python scripts/bench_toy.py                       # table=toy2d_methods, 2 workers
    .venv/bin/python scripts/bench_toy.py --table toy2d_demo    # the demo's reduced table

Runs ``python -m lt_diffusion.table table=<table> workers=<n>`` (n runs side by side, one
thread each) into a fresh output directory, prints the wall-clock time and the CPU time of the
processes it started (on a machine whose cores other processes share, the CPU time divided by
the workers is what the same work takes on idle cores), then ``scripts/plot_toy.py``. Exits with the table command's code.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="toy2d_methods")
    parser.add_argument(
        "--output-dir", default=None, help="default: outputs/bench_toy/<date-time> (fresh)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="runs side by side (one thread each; default 2)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip scripts/plot_toy.py")
    args = parser.parse_args()
    out = Path(args.output_dir or ROOT / "outputs" / "bench_toy" / time.strftime("%Y%m%d-%H%M%S"))
    cmd = [sys.executable, "-m", "lt_diffusion.table", f"table={args.table}",
           f"paths.output_dir={out}", f"workers={args.workers}"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(
        f"\ntable={args.table}: {minutes(wall)} wall clock, {minutes(cpu)} CPU "
        f"({os.cpu_count()} cores here; exit code {code}); outputs in {out}",
        flush=True,
    )
    if code == 0 and not args.no_plot:
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "plot_toy.py"), "--table", args.table,
             "--output-dir", str(out)],
            cwd=ROOT, env=env, check=False,
        )  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
