"""peft's LoRA against our low-rank layers (lt_diffusion/models/lowrank.py) on CM's setting.

CM reserves capacity as ``W = W_g + B A`` in every Conv2d / Linear of the CIFAR U-Net's
up-sampling half at rank ``round(0.1 min(d, k))`` (the CM paper, eq. 1 and Sec. G.1). peft's
LoRA can hold the same factors (``lora_A`` = A as an r-channel conv with W's kernel,
``lora_B`` = B as a 1x1 conv, ``lora_alpha = r`` so the scale is 1; per-layer ranks through
``rank_pattern``) and switch them off (``disable_adapter_layers``: CM's theta_g forward).

    .venv/bin/python scripts/bench_lowrank.py            # CPU: numbers, then speed
    .venv/bin/python scripts/bench_lowrank.py --iters 5 --batch 64

1. Numbers: the same A, B and W_g in both, float64: outputs with and without the low-rank
   part, and the gradients of A, B and W_g, compared.
2. Speed: forward + backward of the float32 CIFAR U-Net at batch 64 (median of ``--iters``),
   the plain U-Net, ours and peft's, taken in turn.

Prints a table; asserts nothing (docs/methods/cm.md has a measured run and the decision).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from lt_diffusion.models import UNet
from lt_diffusion.models.lowrank import (
    lowrank_layers,
    reserve_capacity,
    select_layers,
    set_expert_enabled,
)

CIFAR = dict(ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), num_res_blocks=2, dropout=0.0)


def plain_unet(dtype: torch.dtype) -> UNet:
    torch.manual_seed(0)
    return UNet(image_size=32, in_channels=3, num_classes=10, **CIFAR).to(dtype)


def ours(model: UNet) -> UNet:
    """CM's transform, with B drawn too (B = 0 at init would make the low-rank path vanish)."""
    model = reserve_capacity(copy.deepcopy(model), rank_ratio=0.1, layers="up")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lowrank_layers(model):
            b = layer.lowrank_B
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.02)
    return model


def peft_twin(plain: UNet, mine: UNet) -> nn.Module:
    """peft LoRA on the same layers, ranks and factors as ``mine``, scale 1."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _ in select_layers(plain, "up")]
    ranks = {n: dict(mine.named_modules())[n].rank for n in names}
    # Exact-name patterns: a regex anchored on the whole module name.
    config = LoraConfig(
        r=1,
        lora_alpha=1,
        target_modules=names,
        rank_pattern={f"^{n}$": r for n, r in ranks.items()},
        alpha_pattern={f"^{n}$": r for n, r in ranks.items()},
    )
    twin = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, twin)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name in names:
            src, dst = dict(mine.named_modules())[name], modules[name]
            assert dst.scaling["default"] == 1.0 and dst.r["default"] == src.rank, name
            a, b = dst.lora_A["default"].weight, dst.lora_B["default"].weight
            a.copy_(src.lowrank_A.view(a.shape))
            b.copy_(src.lowrank_B.view(b.shape))
    for p in twin.parameters():
        p.requires_grad_(True)  # CM trains W_g too; peft leaves only the factors trainable
    return twin


def set_peft_enabled(model: nn.Module, enabled: bool) -> None:
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.enable_adapters(enabled)


def inputs(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


def compare_numbers() -> None:
    plain = plain_unet(torch.float64)
    mine = ours(plain)
    twin = peft_twin(plain, mine)
    x, t, y = inputs(4, torch.float64)
    print("numbers (float64, batch 4):")
    for enabled, what in ((True, "theta = W_g + B A"), (False, "theta_g only (switch off)")):
        set_expert_enabled(mine, enabled)
        set_peft_enabled(twin, enabled)
        a, b = mine(x, t, y), twin(x, t, y)
        rel = float((a - b).abs().max() / a.abs().max())
        print(f"  output, {what:27s} max |ours - peft| / max |ours| = {rel:.1e}")
    set_expert_enabled(mine, True)
    set_peft_enabled(twin, True)
    mine(x, t, y).square().mean().backward()
    twin(x, t, y).square().mean().backward()
    worst = {"A": 0.0, "B": 0.0, "W_g": 0.0}
    modules = dict(twin.named_modules())
    for name, layer in ((n, m) for n, m in mine.named_modules() if m in lowrank_layers(mine)):
        other = modules[name]
        pairs = {
            "A": (layer.lowrank_A.grad, other.lora_A["default"].weight.grad),
            "B": (layer.lowrank_B.grad, other.lora_B["default"].weight.grad),
            "W_g": (layer.weight.grad, other.base_layer.weight.grad),
        }
        for key, (g1, g2) in pairs.items():
            err = float((g1.flatten() - g2.flatten()).abs().max() / g1.abs().max())
            worst[key] = max(worst[key], err)
    for key, err in worst.items():
        print(f"  gradient of {key:3s} (worst layer)                  relative error = {err:.1e}")


def time_fwd_bwd(model: nn.Module, batch: int, iters: int) -> list[float]:
    x, t, y = inputs(batch, torch.float32)
    model.train()
    out = []
    for _ in range(iters + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(x, t, y).square().mean().backward()
        out.append(time.perf_counter() - start)
    return out[1:]


def compare_speed(batch: int, iters: int) -> None:
    plain = plain_unet(torch.float32)
    mine = ours(plain)
    twin = peft_twin(plain, mine)
    models = {"plain U-Net": plain, "ours (W_g + B A, one conv)": mine, "peft LoRA": twin}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(iters):  # in turn, so that a slower moment of the machine hits all three
        for name, model in models.items():
            times[name] += time_fwd_bwd(model, batch, 1)
    base = statistics.median(times["plain U-Net"])
    print(f"speed (float32, batch {batch}, 32 px, {torch.get_num_threads()} threads, "
          f"median of {iters}):")  # fmt: skip
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28s} forward + backward {med:6.2f} s  ({med / base:.2f} x plain)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    compare_numbers()
    compare_speed(args.batch, args.iters)


if __name__ == "__main__":
    main()
