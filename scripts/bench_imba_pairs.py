"""Time the IMBA paper's causal study on the synthetic two-concept data from nothing: the four
tables (distribution vs scale, model size, balancing methods and granularity, gamma), every run
trained and analysed, through the command users run, one table after the other into one fresh
output directory (runs shared between tables are trained once):

    .venv/bin/python scripts/bench_imba_pairs.py              # 2 workers, the specs' seeds
    .venv/bin/python scripts/bench_imba_pairs.py --workers 1

Prints, per table and in all, the wall-clock time and the CPU time of the processes it started
(on a machine whose cores other processes share, the CPU time divided by the workers is what the
same work takes on idle cores), then the tables' Markdown files. Exits with the first non-zero
table command's code.
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
TABLES = ("imba_pairs_causal", "imba_pairs_size", "imba_pairs_methods", "imba_pairs_gamma")


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", default=None, help="default: outputs/bench_imba_pairs/<date-time> (fresh)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="runs side by side (one thread each; default 2)"
    )
    args = parser.parse_args()
    out = Path(
        args.output_dir or ROOT / "outputs" / "bench_imba_pairs" / time.strftime("%Y%m%d-%H%M%S")
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    rows, code = [], 0
    start, cpu0 = time.perf_counter(), children_cpu()
    for table in TABLES:
        cmd = [sys.executable, "-m", "lt_diffusion.table", f"table={table}",
               f"paths.output_dir={out}", f"workers={args.workers}"]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        t, c = time.perf_counter(), children_cpu()
        result = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        rows.append((table, time.perf_counter() - t, children_cpu() - c, result))
        code = code or result
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu0
    print(f"\n{'table':<22} {'wall clock':>14} {'CPU':>14}  exit")
    for table, w, c, result in rows:
        print(f"{table:<22} {minutes(w):>14} {minutes(c):>14}  {result}")
    print(f"{'all four':<22} {minutes(wall):>14} {minutes(cpu):>14}  "
          f"(CPU / {args.workers} workers: {minutes(cpu / args.workers)}; {os.cpu_count()} "
          f"cores here)")  # fmt: skip
    print(f"outputs in {out}; tables in {out / 'tables'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
