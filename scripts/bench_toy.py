"""Time the synthetic benchmark: its training step against a bare PyTorch loop, then the whole
benchmark from nothing, through the commands users run.

    .venv/bin/python scripts/bench_toy.py                        # the step, then both variants
    .venv/bin/python scripts/bench_toy.py --step-only            # the step comparison alone
    .venv/bin/python scripts/bench_toy.py --tables toy2d_demo    # the demo's table (make demo-toy)

**The step.** One DDPM training step on the IR 100 toy2d data (batch 256, the MLP of
``configs/model/mlp.yaml``, Adam, gradient clipping, EMA, warm-up and cosine learning rate, one
thread), timed four ways and printed side by side, as milliseconds of CPU time per step (per
seed-step where seeds train together) and their ratio to the bare loop:

* the bare loop: the same model and objective written out in plain PyTorch (no framework);
* the framework, one run (``lt_diffusion.training.vectorized``, what ``ltd-train
  experiment=toy/toy2d_ddpm`` runs);
* the framework, 10 seeds trained together (what a table's job runs), per seed;
* the Lightning training module (``train.engine=lightning``), for reference.

A framework figure is the marginal cost of a step: two runs of N and 2N steps, the difference
divided by N (the setup, data and checkpoint writes are paid once per run and printed apart).

**The benchmark.** ``python -m lt_diffusion.table table=<t> workers=<n>`` for each table (default
both variants: toy2d_methods and toy2d_shared_methods) into a fresh output directory, with the
wall-clock time and the CPU time of the processes it started. On a machine whose cores other
processes share the wall clock overstates the time; CPU time divided by the workers is what
the same work takes on idle cores. Then ``scripts/plot_toy.py`` for the first table.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def bare_step_ms(steps: int) -> float:
    """CPU ms per step of the bare loop (after 30 warm-up steps)."""
    import torch
    from hydra.utils import instantiate

    from lt_diffusion.diffusion import NoiseSchedule
    from lt_diffusion.runs.build import build_datamodule
    from lt_diffusion.utils.config import compose_config

    cfg = compose_config("train", ["experiment=toy/toy2d_ddpm"])
    dm = build_datamodule(cfg)
    dm.setup()
    x_all, y_all = dm.train_images, dm.train_labels
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    sched = NoiseSchedule()
    batch, null = 256, model.null_label

    def step(k: int, total: int) -> None:
        lr = 3e-3 * min(1.0, (k + 1) / 50) * 0.5 * (1 + math.cos(math.pi * k / total))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_all), (batch,))
        x0, y = x_all[idx], y_all[idx]
        if torch.rand(()) < 0.1:  # label dropout, the whole batch (the toy methods' mode)
            y = torch.full_like(y, null)
        t = torch.randint(0, sched.T, (batch,))
        noise = torch.randn_like(x0)
        loss = (model(sched.q_sample(x0, t, noise), t, y) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.02)

    torch.set_num_threads(1)
    for k in range(30):
        step(k, steps)
    start = time.process_time()
    for k in range(steps):
        step(k, steps)
    return (time.process_time() - start) / steps * 1e3


def framework_cpu_s(engine: str, seeds: int, steps: int, out: Path) -> float:
    """CPU seconds of one ``lt_diffusion.train`` process (or a group of ``seeds`` runs through
    the vectorised engine) training DDPM for ``steps`` steps into a fresh directory."""
    shutil.rmtree(out, ignore_errors=True)
    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from lt_diffusion.utils.config import compose_config
from lt_diffusion.training import run as train
cfgs = []
for s in range({seeds}):
    c = compose_config("train", ["experiment=toy/toy2d_ddpm", f"seed={{s}}", f"imbalance.seed={{s}}",
        "train.max_steps={steps}", "train.engine={engine}", "paths.output_dir={out}",
        "train.ckpt_every={steps}", "train.export=false", "callbacks.progress_bar=null"])
    c.paths.run_dir = "{out}/runs/" + str(c.run_name)
    cfgs.append(c)
start = time.process_time()
train.run(cfgs[0]) if len(cfgs) == 1 else train.run_together(cfgs)
print("CPU_SECONDS", time.process_time() - start)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CPU_SECONDS")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{engine} x{seeds} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return float(lines[0].split()[1])


def step_comparison(steps: int) -> None:
    print(f"One DDPM step on toy2d IR 100 (batch 256, one thread), CPU time; {steps} steps each")
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_step_ms(steps)
        rows = [("bare PyTorch loop", bare, None)]
        for label, engine, seeds in (
            ("framework, one run", "vectorized", 1),
            ("framework, 10 seeds together, per seed", "vectorized", 10),
            ("Lightning module (train.engine=lightning)", "lightning", 1),
        ):
            n = steps if seeds == 1 else max(steps // 5, 40)
            short = framework_cpu_s(engine, seeds, n, Path(tmp) / "a")
            long = framework_cpu_s(engine, seeds, 2 * n, Path(tmp) / "b")
            per_step = (long - short) / n / seeds * 1e3
            rows.append((label, per_step, max(short - n * per_step * seeds / 1e3, 0.0)))
    print(f"  {'':44s} {'ms/step':>9s} {'x bare':>8s} {'setup s':>9s}")
    for label, ms, setup in rows:
        fixed = "" if setup is None else f"{setup:9.1f}"
        print(f"  {label:44s} {ms:9.2f} {ms / bare:8.2f} {fixed}")
    print(flush=True)


def run_table(table: str, out: Path, workers: int) -> tuple[float, float, int]:
    cmd = [sys.executable, "-m", "lt_diffusion.table", f"table={table}",
           f"paths.output_dir={out}", f"workers={workers}"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["toy2d_methods", "toy2d_shared_methods"])
    parser.add_argument("--output-dir", default=None, help="default: outputs/bench_toy/<date-time>")
    parser.add_argument("--workers", type=int, default=2, help="jobs side by side (default 2)")
    parser.add_argument("--steps", type=int, default=300, help="steps of the step comparison")
    parser.add_argument("--step-only", action="store_true", help="only the step comparison")
    parser.add_argument("--no-step", action="store_true", help="skip the step comparison")
    parser.add_argument("--no-plot", action="store_true", help="skip scripts/plot_toy.py")
    args = parser.parse_args()
    if not args.no_step:
        step_comparison(args.steps)
    if args.step_only:
        return 0
    out = Path(args.output_dir or ROOT / "outputs" / "bench_toy" / time.strftime("%Y%m%d-%H%M%S"))
    results, code = [], 0
    for table in args.tables:
        wall, cpu, rc = run_table(table, out, args.workers)
        results.append((table, wall, cpu, rc))
        code = code or rc
    print(f"\nThe benchmark from nothing, {args.workers} workers, {os.cpu_count()} cores here:")
    for table, wall, cpu, rc in results:
        print(f"  {table:26s} {minutes(wall)} wall clock, {minutes(cpu)} CPU (exit code {rc})")
    wall, cpu = sum(r[1] for r in results), sum(r[2] for r in results)
    print(f"  {'total':26s} {minutes(wall)} wall clock, {minutes(cpu)} CPU; CPU / workers = "
          f"{minutes(cpu / args.workers)} (the wall clock on idle cores); outputs in {out}")  # fmt: skip
    if code == 0 and not args.no_plot:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "plot_toy.py"), "--table", args.tables[0],
             "--output-dir", str(out)],
            cwd=ROOT, env=env, check=False,
        )  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
