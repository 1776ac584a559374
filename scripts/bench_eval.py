"""Evaluation speed: Inception feature extraction and DDIM generation, in images per second.

    .venv/bin/python scripts/bench_eval.py            # CPU numbers (small batches)
    python scripts/bench_eval.py --protocol            # on a GPU: the cm_paper protocol's cost
                                                       # for a 32x32 model (goal: 50k features < 60 s)
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from lt_diffusion.diffusion import DDIMSampler, NoiseSchedule, balanced_labels, generate
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.inception import load_extractor
from lt_diffusion.models import UNet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_features(n: int, batch: int, device: torch.device) -> float:
    extractor, _ = load_extractor(device)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    extract_features(images[:batch], extractor, batch, device)  # warm-up
    sync(device)
    t = time.perf_counter()
    extract_features(images, extractor, batch, device)
    sync(device)
    return n / (time.perf_counter() - t)


def cifar_model(device: torch.device) -> UNet:
    return UNet(32, 3, 128, (1, 2, 2, 2), (16,), 2, 0.1, 10).to(device).eval()


def time_generation(model: UNet, n: int, batch: int, steps: int, device: torch.device) -> float:
    sampler = DDIMSampler(NoiseSchedule().to(device), steps=steps)
    labels = balanced_labels(model.num_classes, -(-n // model.num_classes))[:n]
    shape = (model.in_channels, model.image_size, model.image_size)
    generate(
        model, sampler, labels[:batch], seed=0, batch_size=batch, image_shape=shape, device=device
    )
    sync(device)
    t = time.perf_counter()
    generate(
        model,
        sampler,
        labels,
        seed=0,
        batch_size=batch,
        image_shape=shape,
        guidance=1.5,
        device=device,
    )
    sync(device)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", action="store_true", help="time the cm_paper protocol (GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}")
    n_feat, b_feat = (5000, 500) if gpu else (64, 32)
    print(
        f"Inception features: {time_features(n_feat, b_feat, device):8.1f} images/s (batch {b_feat})"
    )
    model = cifar_model(device)
    n_gen, b_gen = (2000, 500) if gpu else (8, 8)
    rate = time_generation(model, n_gen, b_gen, 50, device)
    print(f"DDIM-50 generation, CIFAR U-Net (35.7M), CFG: {rate:8.1f} images/s (batch {b_gen})")
    if args.protocol:
        if not gpu:
            raise SystemExit("--protocol is meant for a GPU: on this CPU it would take days")
        # cm_paper on CIFAR-10: 60k generated (max of overall and per-split need per class),
        # 50k real + 60k generated feature passes.
        t = time.perf_counter()
        feat_rate = time_features(50_000, 500, device)
        print(f"cm_paper feature pass, 50k images: {50_000 / feat_rate:6.1f} s")
        gen_rate = time_generation(model, 60_000, 1000, 50, device)
        total = 60_000 / gen_rate + 110_000 / feat_rate
        print(
            f"cm_paper protocol (60k generated + 110k feature passes): {total:6.1f} s "
            f"(measured parts in {time.perf_counter() - t:.1f} s)"
        )


if __name__ == "__main__":
    main()
