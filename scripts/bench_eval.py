"""Evaluation speed, side by side on one device (issue: "evaluation at the hardware's pace"):

  generation of N images, DDIM-50 + classifier-free guidance, the CIFAR U-Net:
    (a) this project's path (``lt_diffusion.diffusion.generate``: seeded chunks, the sampler's
        guided reverse loop, uint8 output);
    (b) diffusers' DDIMScheduler driving the same network (CFG as one doubled batch), the
        reference;
  Inception features of N uint8 32x32 images:
    (c) this project's path (``extract_features``: batching, grey to RGB, float64 output);
    (d) torch-fidelity's extractor called directly on the same batches, the reference.

    .venv/bin/python scripts/bench_eval.py             # CPU, tiny sizes: the ratios
    python scripts/bench_eval.py --protocol             # GPU: also the cm_paper protocol's cost
    python scripts/bench_eval.py --weights FILE         # any Inception weights file (speed only)

On the CPU torch runs one thread and times are process CPU seconds (other jobs on the machine do
not distort the ratios); on a GPU, wall-clock seconds after a warm-up. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lt_diffusion.diffusion import DDIMSampler, NoiseSchedule, balanced_labels, generate
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.inception import load_extractor
from lt_diffusion.models import UNet


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` after one warm-up call (see the module docstring)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def cifar_model(device: torch.device) -> UNet:
    return UNet(32, 3, 128, (1, 2, 2, 2), (16,), 2, 0.1, 10).to(device).eval()


def ours_generate(model: UNet, labels: torch.Tensor, batch: int, device: torch.device) -> None:
    sampler = DDIMSampler(NoiseSchedule().to(device), steps=50)
    generate(
        model, sampler, labels, seed=0, batch_size=batch, image_shape=(3, 32, 32),
        guidance=1.5, device=device,
    )  # fmt: skip


@torch.inference_mode()
def diffusers_generate(model: UNet, labels: torch.Tensor, batch: int, device: torch.device) -> None:
    """The same network and guidance, stepped by diffusers' DDIMScheduler (eta 0, linear betas,
    50 leading steps), CFG as one doubled batch: ``eps_u + (1 + w) (eps_c - eps_u)``."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        clip_sample=True, set_alpha_to_one=False, timestep_spacing="leading",
    )  # fmt: skip
    scheduler.set_timesteps(50)
    w = 1.5
    for chunk in labels.to(device).split(batch):
        x = torch.randn(len(chunk), 3, 32, 32, device=device)
        null = torch.full_like(chunk, model.null_label)
        for t in scheduler.timesteps:
            tt = torch.full((2 * len(chunk),), int(t), device=device)
            eps_c, eps_u = model(torch.cat([x, x]), tt, torch.cat([chunk, null])).chunk(2)
            x = scheduler.step(eps_u + (1 + w) * (eps_c - eps_u), t, x).prev_sample
        ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.inference_mode()
def bare_features(extractor: torch.nn.Module, images: torch.Tensor, batch: int) -> None:
    device = next(extractor.parameters()).device
    for chunk in images.split(batch):
        extractor(chunk.to(device))[0].double().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", action="store_true", help="time the cm_paper protocol (GPU)")
    parser.add_argument("--n-gen", type=int, default=None, help="images generated (GPU 2000)")
    parser.add_argument("--n-feat", type=int, default=None, help="feature images (GPU 50000)")
    parser.add_argument(
        "--weights", default=None,
        help="an Inception weights file (default: the one evaluations use); speed does not "
        "depend on the values, so a carried copy will do on a machine without the cache",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if args.protocol and not gpu:
        raise SystemExit("--protocol is meant for a GPU: on this CPU it would take days")
    if not gpu:
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if gpu else "cpu (1 thread, CPU seconds)"
    print(f"device {name}, torch {torch.__version__}")

    model = cifar_model(device)
    n_gen = args.n_gen or (2000 if gpu else 4)
    b_gen = min(n_gen, 1000)
    labels = balanced_labels(10, -(-n_gen // 10))[:n_gen]
    ours = n_gen / timed(lambda: ours_generate(model, labels, b_gen, device), device)
    ref = n_gen / timed(lambda: diffusers_generate(model, labels, b_gen, device), device)
    print(f"{'':52}{'img/s':>10}{'x reference':>13}{'50k images':>12}")

    def row(label: str, rate: float, reference: float) -> None:
        print(f"{label:52}{rate:10.1f}{rate / reference:13.2f}{50_000 / rate:10.1f} s", flush=True)

    row("(b) diffusers DDIMScheduler + the same U-Net, CFG", ref, ref)
    row(f"(a) lt_diffusion generate, DDIM-50 + CFG, {n_gen} img", ours, ref)

    extractor, _ = load_extractor(device, weights_path=args.weights)
    n_feat = args.n_feat or (50_000 if gpu else 64)
    b_feat = 500 if gpu else 32
    images = torch.randint(0, 256, (n_feat, 3, 32, 32), dtype=torch.uint8)
    bare = n_feat / timed(lambda: bare_features(extractor, images, b_feat), device)
    path = n_feat / timed(lambda: extract_features(images, extractor, b_feat, device), device)
    row("(d) torch-fidelity Inception, called directly", bare, bare)
    row(f"(c) lt_diffusion extract_features, {n_feat} img", path, bare)
    print(
        "targets: (c) takes at most 1.3x (d)'s time, i.e. x reference >= 0.77; on an H100-class "
        "GPU 50k generated images <= 150 s and 50k features <= 15 s"
    )
    if args.protocol:
        # cm_paper on CIFAR-10: 60k generated (the most any comparison needs per class) and
        # 50k real + 60k generated feature passes.
        total = 60_000 / ours + 110_000 / path
        print(
            f"cm_paper protocol estimate (60k generated + 110k feature passes): {total:6.1f} s "
            "(target <= 240 s)"
        )


if __name__ == "__main__":
    main()
