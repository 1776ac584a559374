"""Focal and ADA objectives against independent float64 recomputations, the augmentation
pipeline's exact behaviour, RS's class-balanced stream, every method config, and a short
training run of each."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods import (
    AUG_DIM,
    ADAObjective,
    AugmentParams,
    AugmentPipeline,
    CBDMObjective,
    DDPMObjective,
    FocalObjective,
    enable_augment_labels,
)
from lt_diffusion.models.unet import UNet
from tests.conftest import compose_config
from tests.objectives import T, TinyNet, abar_of, draw_labels, toy_batch, train_losses

COUNTS = [5, 3, 1]
METHODS = ["ddpm", "cbdm", "oc", "rs", "focal", "ada"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _noised(x0: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draws the objectives make after re-seeding: t, then eps; returns t, eps, x_t."""
    torch.manual_seed(seed)
    t = torch.randint(0, T, (x0.shape[0],))
    eps = torch.randn_like(x0)
    abar = abar_of(t)
    return t, eps, abar.sqrt() * x0 + (1 - abar).sqrt() * eps


# ----------------------------------------------------------------------------------------------
# Focal


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_batch_baseline_loss_and_gradients_equal_formula(sched, gamma: float) -> None:
    obj = FocalObjective(gamma=gamma, baseline="batch", cond_drop_prob=0.0)
    obj.setup(COUNTS)
    model = TinyNet()
    x0, y = toy_batch(8)
    torch.manual_seed(2)
    out = obj(model, x0, y, sched)
    got = torch.autograd.grad(out.loss, [model.w, model.b])

    t, eps, x_t = _noised(x0, 2)
    per = ((model.formula(x_t, t, y) - eps) ** 2).mean(dim=(1, 2, 3))
    r = per.detach() ** gamma
    w = r / r.mean()
    ref = (w * per).mean()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["mse"].double(), per.mean(), rtol=1e-5, atol=1e-8)
    # The weights are constants: the gradients are those of sum_i w_i l_i with w detached.
    for a, b in zip(got, torch.autograd.grad(ref, [model.w, model.b]), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    if gamma == 0.0:  # gamma = 0 is DDPM
        torch.testing.assert_close(out.loss.double(), per.mean(), rtol=1e-6, atol=1e-9)


def test_focal_timestep_baseline_follows_its_running_means(sched) -> None:
    obj = FocalObjective(
        gamma=1.0, baseline="timestep", num_buckets=4, ema_decay=0.5, cond_drop_prob=0.0
    )
    obj.setup(COUNTS)
    model = TinyNet()
    x0, y = toy_batch(16)
    means: dict[int, float] = {}
    for step, seed in enumerate((21, 22)):
        torch.manual_seed(seed)
        out = obj(model, x0, y, sched)

        t, eps, x_t = _noised(x0, seed)
        per = ((model.formula(x_t, t, y) - eps) ** 2).mean(dim=(1, 2, 3)).detach()
        buckets = [int(v) * 4 // T for v in t]
        for k in set(buckets):
            batch_mean = float(torch.stack([per[i] for i in range(16) if buckets[i] == k]).mean())
            means[k] = 0.5 * means[k] + 0.5 * batch_mean if k in means else batch_mean
        r = torch.stack([per[i] / means[buckets[i]] for i in range(16)])
        w = r / r.mean()
        ref = (w * per).mean()
        torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8, msg=f"{step}")
    seen = sorted(means)
    assert obj.bucket_seen.nonzero().flatten().tolist() == seen
    expected = torch.tensor([means[k] for k in seen], dtype=torch.float64)
    torch.testing.assert_close(obj.bucket_loss[seen].double(), expected, rtol=1e-6, atol=1e-9)


def test_focal_weights_are_normalised_to_batch_mean_one() -> None:
    torch.manual_seed(0)
    loss = torch.rand(64) * 3
    t = torch.randint(0, T, (64,))
    for baseline in ("batch", "timestep"):
        for gamma in (0.5, 1.0, 2.0):
            w = FocalObjective(gamma=gamma, baseline=baseline).weights(loss, t, T)
            torch.testing.assert_close(w.mean(), torch.tensor(1.0))
            assert (w >= 0).all()
    w = FocalObjective(gamma=0.0, baseline="batch").weights(loss, t, T)
    torch.testing.assert_close(w, torch.ones(64))
    raw = FocalObjective(gamma=2.0, baseline="batch", normalize=False).weights(loss, t, T)
    torch.testing.assert_close(raw, loss**2)
    with pytest.raises(ValueError, match="baseline"):
        FocalObjective(baseline="class")


# ----------------------------------------------------------------------------------------------
# ADA: the augmentation pipeline


def _images(n: int = 4, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


def test_augmentation_with_p_zero_is_the_identity_with_zero_labels() -> None:
    x = _images()
    pipe = AugmentPipeline(p=0.0)
    out, labels = pipe(x)
    assert torch.equal(out, x) and labels.shape == (4, AUG_DIM) and not labels.any()
    # The full sample -> apply path with nothing applied is exactly the identity too.
    params = pipe.sample(4, 16, 16, x.device)
    assert torch.equal(pipe.apply(x, params), x)
    assert not pipe.labels(params, 16, 16).any()


def test_augmentation_with_p_one_labels_every_image() -> None:
    torch.manual_seed(0)
    x = _images(32)
    out, labels = AugmentPipeline(p=1.0)(x)
    assert labels.shape == (32, AUG_DIM) and torch.isfinite(labels).all()
    assert (labels[:, 0] == 1).all() and (labels[:, 1] == 1).all()  # both flips fired
    assert (labels[:, 4] != 0).all() and (labels[:, 6] != 0).all()  # scale, rotation
    assert (labels[:, 7:].abs().sum(1) > 0).all()  # anisotropy
    assert not torch.equal(out, x)
    # Rotation labels lie on the circle (cos - 1, sin).
    torch.testing.assert_close((labels[:, 5] + 1) ** 2 + labels[:, 6] ** 2, torch.ones(32))


def test_augmentation_rate_matches_p() -> None:
    torch.manual_seed(0)
    x = _images(20_000, c=1, h=4, w=4)
    _, labels = AugmentPipeline(p=0.12)(x)
    for col in (0, 1, 4):  # x-flip, y-flip, scale: each fires with probability p
        rate = (labels[:, col] != 0).double().mean()
        assert abs(rate - 0.12) < 5 * math.sqrt(0.12 * 0.88 / 20_000), (col, rate)


def test_flips_are_exact_and_self_inverse() -> None:
    x = _images()
    pipe = AugmentPipeline(p=1.0)
    params = AugmentParams.identity(4)
    params.xflip = torch.tensor([1.0, 0.0, 1.0, 0.0])
    params.yflip = torch.tensor([0.0, 0.0, 1.0, 1.0])
    out = pipe.apply(x, params)
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(1).flip(2)) and torch.equal(out[3], x[3].flip(1))
    assert torch.equal(pipe.apply(out, params), x)
    labels = pipe.labels(params, 16, 16)
    assert labels[:, 0].tolist() == [1, 0, 1, 0] and labels[:, 1].tolist() == [0, 0, 1, 1]
    assert not labels[:, 2:].any()


def test_integer_translation_moves_content_by_whole_pixels_and_inverts() -> None:
    x = _images(2)
    pipe = AugmentPipeline(p=1.0, translate_max=0.25)
    params = AugmentParams.identity(2)
    params.tx = torch.tensor([2, -3])
    params.ty = torch.tensor([-1, 4])
    out = pipe.apply(x, params)
    # out[y, x] = in[y - ty, x - tx] wherever the source lies inside the image.
    for n, (tx, ty) in enumerate([(2, -1), (-3, 4)]):
        for yy in range(16):
            for xx in range(16):
                sy, sx = yy - ty, xx - tx
                if 0 <= sy < 16 and 0 <= sx < 16:
                    assert torch.equal(out[n, :, yy, xx], x[n, :, sy, sx])
    # Shifting back restores the pixels that never left the image.
    back = AugmentParams.identity(2)
    back.tx, back.ty = -params.tx, -params.ty
    restored = pipe.apply(out, back)
    assert torch.equal(restored[0, :, 1:16, 0:14], x[0, :, 1:16, 0:14])
    assert torch.equal(restored[1, :, 0:12, 3:16], x[1, :, 0:12, 3:16])
    labels = pipe.labels(params, 16, 16)  # tx / (W * translate_max), W * 0.25 = 4 pixels
    torch.testing.assert_close(labels[:, 2], torch.tensor([0.5, -0.75]))
    torch.testing.assert_close(labels[:, 3], torch.tensor([-0.25, 1.0]))


def test_quarter_turn_rotation_is_exact_on_the_pixel_grid() -> None:
    x = _images(2)
    pipe = AugmentPipeline(p=1.0)
    params = AugmentParams.identity(2)
    params.rotate = torch.tensor([math.pi / 2, -math.pi / 2])
    out = pipe.apply(x, params)
    # x right, y down: +pi/2 turns the top edge to the right edge (clockwise on screen).
    torch.testing.assert_close(out[0], torch.rot90(x[0], k=-1, dims=(1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], k=1, dims=(1, 2)), atol=1e-4, rtol=0)
    labels = pipe.labels(params, 16, 16)
    torch.testing.assert_close(labels[:, 5:7], torch.tensor([[-1.0, 1.0], [-1.0, -1.0]]))


def test_isotropic_scale_acts_about_the_centre() -> None:
    # Shrinking the content by s about the centre turns a linear ramp into one of slope 1 / s
    # (away from the borders, where the reflection padding enters the bicubic taps).
    h = w = 16
    ramp = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2).expand(1, 1, h, w)
    pipe = AugmentPipeline(p=1.0, scale_std=0.2)
    params = AugmentParams.identity(1)
    params.scale = torch.tensor([-5.0])  # s = 2^(0.2 * -5) = 1/2: zoom out
    out = pipe.apply(ramp.clone(), params)
    torch.testing.assert_close(out[0, 0, :, 5:11], 2 * ramp[0, 0, :, 5:11], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# ADA: the model hook and the objective


def _tiny_unet(**kw) -> UNet:
    args = dict(image_size=8, in_channels=1, ch=32, ch_mult=[1, 2], attn_resolutions=[])
    return UNet(**args, num_res_blocks=1, dropout=0.0, num_classes=3, **kw)


def test_enable_augment_labels_adds_the_input_and_leaves_sampling_unchanged() -> None:
    torch.manual_seed(0)
    plain = _tiny_unet()
    model = enable_augment_labels(plain)
    assert model is plain and model.augment_dim == AUG_DIM
    torch.nn.init.normal_(model.aug_emb.weight)  # non-trivial weights
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    model.eval()
    with torch.no_grad():
        sampling = model(x, t, y)  # how the samplers call it: no aug_labels
        zeros = model(x, t, y, aug_labels=torch.zeros(2, AUG_DIM))
        some = model(x, t, y, aug_labels=torch.randn(2, AUG_DIM))
    assert torch.equal(sampling, zeros) and not torch.equal(sampling, some)
    # The state dict matches a U-Net built with augment_dim = 9 (checkpoints reload).
    assert model.state_dict().keys() == _tiny_unet(augment_dim=AUG_DIM).state_dict().keys()
    built = _tiny_unet(augment_dim=AUG_DIM)
    assert enable_augment_labels(built) is built
    with pytest.raises(ValueError, match="augment_dim"):
        enable_augment_labels(_tiny_unet(augment_dim=5))


def test_ada_objective_refuses_a_model_without_augmentation_labels(sched) -> None:
    obj = ADAObjective(DDPMObjective())
    obj.setup(COUNTS)
    with pytest.raises(ValueError, match="model.augment_dim=9"):
        obj(_tiny_unet(), torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), sched)


@pytest.mark.parametrize("base", ["ddpm", "cbdm"])
def test_ada_loss_equals_the_base_formula_on_the_augmentedtoy_batch(sched, base: str) -> None:
    make = {"ddpm": DDPMObjective, "cbdm": CBDMObjective}[base]
    obj = ADAObjective(make(cond_drop_prob=0.0), p=0.5)
    obj.setup(COUNTS)
    model = TinyNet()
    x0, y = toy_batch(8)
    torch.manual_seed(4)
    out, ctx = obj.compute(model, x0, y, sched)

    # Same draws: the augmentation first, then t and eps (and y' for CBDM).
    torch.manual_seed(4)
    pipe = AugmentPipeline(p=0.5)
    params = pipe.sample(8, 4, 4, x0.device)
    x_aug, labels = pipe.apply(x0, params), pipe.labels(params, 4, 4)
    t = torch.randint(0, T, (8,))
    eps = torch.randn_like(x0)
    abar = abar_of(t)
    x_t = abar.sqrt() * x_aug + (1 - abar).sqrt() * eps
    h = model.formula(x_t, t, y, labels)
    ref = ((h - eps) ** 2).mean()
    if base == "cbdm":
        probs = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
        h_bal = model.formula(x_t, t, draw_labels(probs, 8), labels)
        ref = ref + 1.25 * ((t.double() / T)[:, None, None, None] * (h - h_bal) ** 2).mean()
    assert labels.any()  # something was augmented
    torch.testing.assert_close(ctx.aug_labels.double(), labels.double())
    # (The loss matches only if every model call of the step got the labels.)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["cbdm", "cbdm-sample", "oc", "focal", "ada-cbdm"])
def test_objectives_train_under_bf16_autocast_with_float32_losses(method: str) -> None:
    from lt_diffusion.methods import OCObjective

    objective = {
        "cbdm": lambda: CBDMObjective(cond_drop_prob=0.0),
        "cbdm-sample": lambda: CBDMObjective(cond_drop_prob=0.5, cond_drop_mode="sample"),
        "oc": lambda: OCObjective(cond_drop_prob=0.0),
        "focal": lambda: FocalObjective(cond_drop_prob=0.0),
        "ada-cbdm": lambda: ADAObjective(CBDMObjective(cond_drop_prob=0.0), p=0.5),
    }[method]()
    objective.setup(COUNTS)
    torch.manual_seed(0)
    model = enable_augment_labels(_tiny_unet())
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ctx = objective.compute(model, x0, torch.arange(6) % 3, NoiseSchedule(T))
    assert ctx.eps_pred.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.terms.values())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# Method configs and RS


@pytest.mark.parametrize("method", METHODS)
def test_method_config_builds_its_objective_and_model(method: str) -> None:
    from lt_diffusion.runs.build import build_model, build_objective

    cfg = compose_config("train", [f"method={method}", "model=unet_tiny", "dataset.image_size=8"])
    assert cfg.method.name == method
    objective = build_objective(cfg)
    objective.setup(list(range(cfg.dataset.num_classes, 0, -1)))
    model = build_model(cfg)
    assert model.augment_dim == (AUG_DIM if method == "ada" else 0)
    x = torch.randn(4, cfg.dataset.channels, 8, 8)
    out = objective(model, x, torch.tensor([0, 1, 2, 0]), NoiseSchedule(T))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_rs_streams_class_balanced_batches(tiny_cifar: Path, tmp_path: Path) -> None:
    from lt_diffusion.runs.build import build_datamodule

    cfg = compose_config(
        "train",
        [
            "method=rs",
            "dataset=cifar10_lt",
            "imbalance=ir10",
            f"paths.data_root={tiny_cifar}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            "dataset.source.download=false",
            "data.batch_size=50",
        ],
    )
    dm = build_datamodule(cfg)
    dm.setup("fit")
    counts = torch.as_tensor(list(dm.class_counts), dtype=torch.float64)
    assert counts.max() / counts.min() >= 5  # the training set itself is long-tailed
    labels = []
    it = iter(dm.train_dataloader())
    for _ in range(80):
        labels.append(next(it)[1])
    freq = torch.bincount(torch.cat(labels), minlength=10).double()
    n = freq.sum()
    p = 1.0 / 10
    assert ((freq / n - p).abs() <= 5 * math.sqrt(p * (1 - p) / n)).all(), freq


# ----------------------------------------------------------------------------------------------
# Short training runs


@pytest.mark.parametrize(
    "make,transform",
    [
        (lambda: DDPMObjective(), None),
        (lambda: FocalObjective(), None),
        (lambda: FocalObjective(baseline="batch"), None),
        (lambda: ADAObjective(DDPMObjective(), p=0.5), enable_augment_labels),
    ],
    ids=["ddpm", "focal", "focal-batch", "ada"],
)
def test_short_training_run_lowers_the_loss(make, transform) -> None:
    losses = train_losses(make(), steps=60, transform=transform)["loss"]
    first, last = losses[:10].mean(), losses[-10:].mean()
    # The focal loss is a weighted mean dominated by the hardest samples: it falls more slowly
    # than the plain MSE (about 0.35-0.45 of its start after 60 steps, DDPM about 0.13).
    assert last < 0.6 * first, (first, last)
