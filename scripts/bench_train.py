"""Training throughput, side by side on one device and one config (issue: "training at the
hardware's pace"):

  (a) this project's training path: ``lt_diffusion.train``'s own run (Trainer, module,
      datamodule, callbacks, checkpoints), per method;
  (b) a bare PyTorch loop in the papers' style over the same U-Net: fp32 eager, Adam, gradient
      clipping, per-step EMA, the DDPM loss with CFG label dropout (the reference);
  (c) diffusers' UNet2DModel of the same configuration (GPU: bf16 + torch.compile).

    .venv/bin/python scripts/bench_train.py                 # CPU: tiny U-Net, (a) / (b) = overhead
    python scripts/bench_train.py --cifar                   # GPU: the 35.7M CIFAR U-Net, trainer=gpu
    python scripts/bench_train.py --runs ddpm:16 --profile always   # + the step's top ops

(a) is timed as the difference of two real runs (``warmup`` and ``warmup + steps`` steps), so
start-up, compilation and the final checkpoint cancel out. The data are CIFAR-format pickles of
random images written to a temporary folder (throughput does not depend on the pixels). Prints
images / s, the ratios, peak memory and what a 300k-step run would take; asserts nothing. On the
GPU, a run that misses the issue's target is profiled after the table (its top ops by device
time), so one run says both how far off it is and where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lt_diffusion.models.ema import ema_update  # noqa: E402
from lt_diffusion.runs.build import build_model, build_schedule  # noqa: E402
from lt_diffusion.utils.config import compose_config  # noqa: E402


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The run's own output (summary, progress bar, Lightning's notes) out of the table."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        contextlib.redirect_stderr(null),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def clock(device: torch.device) -> float:
    """GPU: wall-clock seconds. CPU: this process's CPU seconds (torch runs one thread there,
    so it equals the wall clock of an idle core and does not count other jobs' load)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"


def overrides(args: argparse.Namespace, data: Path, out: Path, method: str, batch: int) -> list:
    model = "unet_cifar" if args.cifar else "unet_tiny"
    trainer = "gpu" if args.cifar else "cpu"
    return [
        "dataset=cifar10_lt", "imbalance=ir10", f"method={method}", f"model={model}",
        f"trainer={trainer}", "logger=none", f"paths.data_root={data}",
        f"paths.output_dir={out}", "dataset.source.download=false", f"data.batch_size={batch}",
        "train.warmup_steps=10", "train.ckpt_every=100000", "train.grid_every=0",
        "train.grid_per_class=1", "train.grid_steps=1", "train.log_every=50",
        *([] if args.cifar else ["train.threads=1"]),
    ]  # fmt: skip


def train_config(args, data: Path, method: str, batch: int, steps: int) -> DictConfig:
    """The config of a fresh ``steps``-step lt_diffusion.train run in its own temporary folder."""
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = compose_config(
        "train", [*overrides(args, data, out, method, batch), f"train.max_steps={steps}"]
    )
    cfg.paths.run_dir = str(out / "run")
    return cfg


def framework(args, data: Path, method: str, batch: int) -> tuple[float, str]:
    """(a): images / s of lt_diffusion.train, the difference of two real runs."""
    from lt_diffusion.training.run import run

    times = []
    for steps in (args.warmup, args.warmup + args.steps):
        cfg = train_config(args, data, method, batch, steps)
        if args.cifar:
            torch.cuda.reset_peak_memory_stats()
        t = clock(torch.device(args.device))
        with quiet():
            run(cfg)
        times.append(clock(torch.device(args.device)) - t)
    return args.steps * batch / (times[1] - times[0]), peak_gib(torch.device(args.device))


def bare_loop(args, data: Path, batch: int) -> tuple[float, str]:
    """(b): the papers' kind of loop (fp32 eager, Adam, clipping, per-step EMA) on the U-Net."""
    device = torch.device(args.device)
    cfg = compose_config("train", overrides(args, data, Path("/tmp"), "ddpm", batch))
    model = build_model(cfg).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    schedule = build_schedule(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        t = torch.randint(0, schedule.T, (batch,), device=device)
        noise = torch.randn_like(x0)
        labels = y if torch.rand(()).item() >= 0.1 else torch.full_like(y, model.null_label)
        loss = (model(schedule.q_sample(x0, t, noise), t, labels) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, 0.9999)

    return _rate(step, args, batch, device), peak_gib(device)


def diffusers_unet(args, batch: int) -> tuple[float, str]:
    """(c): diffusers' UNet2DModel of the CIFAR configuration (GPU: bf16 + torch.compile)."""
    from diffusers import UNet2DModel

    device = torch.device(args.device)
    ch = (128, 256, 256, 256) if args.cifar else (32, 64)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2 if args.cifar else 1,
        block_out_channels=ch, num_class_embeds=11, norm_num_groups=32 if args.cifar else 8,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", *["DownBlock2D"] * (len(ch) - 2)],
        up_block_types=[*["UpBlock2D"] * (len(ch) - 2), "AttnUpBlock2D", "UpBlock2D"],
    ).to(device)  # fmt: skip
    gpu = device.type == "cuda"
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if gpu else model
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=gpu)
    x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, torch.bfloat16, enabled=gpu):
            out = net(x0 + noise, t, class_labels=y).sample
        loss = (out.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _rate(step, args, batch, device), peak_gib(device)


def _rate(step, args, batch: int, device: torch.device) -> float:
    for _ in range(args.warmup):
        step()
    sync(device)
    t = clock(device)
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * batch / (clock(device) - t)


# The H100-class targets, img/s of lt_diffusion.train per (method, batch).
TARGETS = {("ddpm", 64): 4000.0, ("cbdm", 48): 2000.0}


def parse_runs(text: str) -> list[tuple[str, int]]:
    """``"ddpm:64,cbdm:48"`` -> ``[("ddpm", 64), ("cbdm", 48)]``."""
    runs = []
    for item in text.split(","):
        method, _, batch = item.partition(":")
        if not method or not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--runs takes method:batch pairs like ddpm:64,cbdm:48, not {item!r}")
        runs.append((method, int(batch)))
    return runs


def profile_step(args, data: Path, method: str, batch: int, top: int = 15) -> None:
    """The top ops of a short lt_diffusion.train run by self device time (CPU: self CPU time):
    what a missed target would be closed on."""
    from torch.profiler import ProfilerActivity, profile

    from lt_diffusion.training.run import run

    steps = max(args.warmup, 10)
    cfg = train_config(args, data, method, batch, steps)
    gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    with quiet(), profile(activities=activities) as prof:
        run(cfg)
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(
        f"profile: lt_diffusion.train, {method}, batch {batch}, {steps} steps, top {top} by {key}"
    )
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", action="store_true", help="the CIFAR U-Net on the GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--runs", default=None,
        help="lt_diffusion.train runs as method:batch (default: GPU ddpm:64,cbdm:48,ddpm:128; "
        "CPU ddpm:16,cbdm:16); (b) and (c) run at the first one's batch",
    )  # fmt: skip
    parser.add_argument(
        "--profile", choices=("auto", "always", "never"), default="auto",
        help="print the top ops of a run: auto = of each run that misses its GPU target",
    )  # fmt: skip
    args = parser.parse_args()
    args.device = "cuda" if args.cifar else "cpu"
    if args.cifar and not torch.cuda.is_available():
        raise SystemExit("--cifar times the CIFAR U-Net on a GPU; this machine has none")
    args.steps = args.steps or (200 if args.cifar else 30)
    args.warmup = args.warmup or (30 if args.cifar else 5)
    runs = parse_runs(
        args.runs or ("ddpm:64,cbdm:48,ddpm:128" if args.cifar else "ddpm:16,cbdm:16")
    )
    torch.set_float32_matmul_precision("high")
    if not args.cifar:
        torch.set_num_threads(1)  # CPU times are process CPU seconds of one thread (clock())
    from tests.fakedata import write_cifar10

    data = Path(tempfile.mkdtemp(prefix="bench_data_"))
    write_cifar10(data / "cifar10", n_per_class=500 if args.cifar else 64)
    batch = runs[0][1]
    device = torch.cuda.get_device_name() if args.cifar else "cpu"
    print(f"device {device}, torch {torch.__version__}, batch {batch}, {args.steps} timed steps")
    base, base_mem = bare_loop(args, data, batch)
    ref, ref_mem = diffusers_unet(args, batch)
    print(f"{'':36}{'img/s':>9}{'x bare':>8}{'x diffusers':>13}{'GiB':>6}{'300k steps':>12}")

    def row(name: str, rate: float, mem: str, b: int) -> None:
        hours = 300_000 * b / rate / 3600
        ratios = f"{rate / base:8.2f}{rate / ref:13.2f}" if b == batch else f"{'-':>8}{'-':>13}"
        print(f"{name:36}{rate:9.1f}{ratios}{mem:>6}{hours:10.1f} h", flush=True)

    row("(b) bare fp32 loop (papers' style)", base, base_mem, batch)
    what = "bf16 + compile" if args.cifar else "fp32 eager"
    row(f"(c) diffusers UNet2DModel, {what}", ref, ref_mem, batch)
    missed = []
    for method, b in runs:
        rate, mem = framework(args, data, method, b)
        row(f"(a) lt_diffusion.train, {method}, batch {b}", rate, mem, b)
        target = TARGETS.get((method, b))
        if args.cifar and target is not None and rate < target:
            missed.append((method, b))
    if args.cifar:
        rates = "; ".join(f"{m} batch {b} >= {r:.0f} img/s" for (m, b), r in TARGETS.items())
        print(f"targets (H100 class): {rates}; ddpm batch 64 x bare >= 5.9, x diffusers >= 1.5")
    else:
        print("(a)/(b) on the CPU is the framework's overhead per step (the target: at most "
              "1.10x the bare loop's step time, i.e. x bare >= 0.91)")  # fmt: skip
    if args.profile == "always" and not missed:
        missed = runs[:1]
    if args.profile != "never":
        for method, b in missed:
            profile_step(args, data, method, b)


if __name__ == "__main__":
    main()
