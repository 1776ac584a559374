"""Training-step time of every method relative to DDPM (forward + backward + Adam step).

    .venv/bin/python scripts/bench_methods.py                 # CPU, tiny U-Net
    python scripts/bench_methods.py --cifar --steps 50        # on a GPU: the CIFAR config, bf16
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lt_diffusion.runs.build import build_model, build_objective, build_schedule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def method_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


def step_time(method: str, model_cfg: str, batch: int, steps: int, device: torch.device) -> float:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", [f"method={method}", f"model={model_cfg}", "dataset=cifar10_lt"])
    model = build_model(cfg).to(device)
    objective = build_objective(cfg).to(device)
    objective.setup([int(5000 * 0.01 ** (c / 9)) for c in range(10)])
    schedule = build_schedule(cfg).to(device)
    params = [*model.parameters(), *objective.parameters()]
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-4)
    x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def one() -> None:
        with amp:
            loss = objective(model, x, y, schedule).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", action="store_true", help="the 35.7M CIFAR U-Net (GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = "unet_cifar" if args.cifar else "unet_tiny"
    batch = args.batch or (64 if args.cifar else 16)
    print(f"device {device}, model {model_cfg}, batch {batch}, {args.steps} timed steps")
    base = step_time("ddpm", model_cfg, batch, args.steps, device)
    print(f"{'method':<22}{'ms/step':>10}{'x DDPM':>9}")
    for name in method_names():
        try:
            t = base if name == "ddpm" else step_time(name, model_cfg, batch, args.steps, device)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. a method for another backbone
            print(f"{name:<22}{'n/a':>10}  ({str(err).splitlines()[0][:90]})")
            continue
        print(f"{name:<22}{1000 * t:>10.1f}{t / base:>9.2f}")


if __name__ == "__main__":
    main()
