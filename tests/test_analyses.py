"""The papers' diagnostic analyses: pruning sensitivity, IMBA distance, bottleneck overlap and
gradient dominance, each checked against a recomputation from its definition in float64, and
the command end to end on tiny trained DDPM and CM checkpoints."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from lt_diffusion.analysis import ANALYSES
from lt_diffusion.analysis.common import (
    ClassSamples,
    check_timestep,
    rank_correlation,
    settings_from_config,
    split_means,
)
from lt_diffusion.analysis.feature_overlap import (
    FeatureOverlapSettings,
    chance_purity,
    knn_indices,
    knn_label_purity,
    overlap_matrix,
    per_class_purity,
    pooled_bottleneck_features,
)
from lt_diffusion.analysis.gradient_dominance import (
    GradientDominanceSettings,
    gradient_dominance,
)
from lt_diffusion.analysis.pruning import (
    PruningSettings,
    magnitude_prune_,
    prunable_parameters,
    pruning_sensitivity,
)
from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.models import UNet
from lt_diffusion.models.lowrank import is_lowrank_param, reserve_capacity
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

T = 50  # timesteps of the synthetic schedule


def tiny_unet(num_classes: int = 3, seed: int = 0, norm_group_min_channels: int = 4) -> UNet:
    """unet_tiny's widths at 8 px, float64, with unit-gain weights (Ho et al.'s near-zero
    output layers would make every loss and gradient nearly equal)."""
    torch.manual_seed(seed)
    model = UNet(
        image_size=8, in_channels=3, ch=32, ch_mult=(1, 2), attn_resolutions=(),
        num_res_blocks=1, dropout=0.0, num_classes=num_classes,
        norm_group_min_channels=norm_group_min_channels,
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return model.double().eval()


def synthetic_samples(
    counts: list[int], images_per_class: int | None = None, draws: int = 1, seed: int = 0,
    t: int | None = None,
) -> ClassSamples:  # fmt: skip
    g = torch.Generator().manual_seed(123)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]  # classes interleaved, as on disk
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), generator=g, dtype=torch.uint8)
    return ClassSamples(images, labels, len(counts), images_per_class, draws, seed, T, t)


def schedule64() -> NoiseSchedule:
    return NoiseSchedule(num_timesteps=T).double()


def sample_list(samples: ClassSamples, c: int) -> list:
    """Class ``c``'s samples one at a time (batch size 1), for the direct recomputations."""
    return list(samples.batches(c, 1, "cpu", torch.float64))


def mse64(model: nn.Module, schedule: NoiseSchedule, b) -> torch.Tensor:
    x_t = schedule.sqrt_alphas_cumprod[b.t].view(-1, 1, 1, 1) * b.x0
    x_t = x_t + schedule.sqrt_one_minus_alphas_cumprod[b.t].view(-1, 1, 1, 1) * b.noise
    return (model(x_t, b.t, b.y) - b.noise).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# Fixed draws and settings


def test_draws_are_fixed_per_image_whatever_the_batching() -> None:
    a = synthetic_samples([7, 4, 2], draws=3, seed=5)
    one = sample_list(a, 0)
    big = list(a.batches(0, 64, "cpu", torch.float64))
    assert len(big) == 1 and a.count(0) == 21
    for key in ("x0", "t", "noise", "y", "index"):
        assert torch.equal(torch.cat([getattr(b, key) for b in one]), getattr(big[0], key))
    # Another subset size keeps each shared image's draws; another seed changes them.
    sub = synthetic_samples([7, 4, 2], images_per_class=3, draws=3, seed=5)
    assert len(sub.indices(0)) == 3 and len(sub.indices(2)) == 2
    for b in sub.batches(0, 3, "cpu", torch.float64):
        i = int(b.index[0])
        ref = next(x for x in one if int(x.index[0]) == i)
        assert torch.equal(b.noise, ref.noise) and torch.equal(b.t, ref.t)
    other = synthetic_samples([7, 4, 2], draws=3, seed=6)
    assert not torch.equal(next(other.batches(0, 64)).noise, big[0].noise.float())
    # A fixed timestep; images come from the right class, scaled to [-1, 1].
    fixed = synthetic_samples([7, 4, 2], draws=2, t=T - 1)
    b = next(fixed.batches(1, 64))
    assert torch.all(b.t == T - 1) and torch.all(b.y == 1)
    assert torch.all(fixed.labels[b.index] == 1)
    assert torch.allclose(b.x0, fixed.images[b.index].float() / 127.5 - 1.0)


def test_bad_settings_are_refused_with_the_reason() -> None:
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
            PruningSettings(fraction=bad)
    with pytest.raises(ValueError, match="scope"):
        PruningSettings(scope="biases")
    with pytest.raises(ValueError, match="images_per_class"):
        PruningSettings(images_per_class=0)
    with pytest.raises(ValueError, match="k"):
        FeatureOverlapSettings(k=0)
    with pytest.raises(ValueError, match="both majority and minority"):
        GradientDominanceSettings(majority=["many", "few"], minority=["few"])
    with pytest.raises(ValueError, match="unknown setting"):
        settings_from_config(PruningSettings, {"name": "pruning", "fractoin": 0.2})
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        check_timestep(50, T)
    assert check_timestep(None, T) == T - 1


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_every_analysis_config_composes_into_its_settings(name: str) -> None:
    cfg = compose_config("analyze", [f"analysis={name}", "checkpoint=x.ckpt"])
    assert cfg.analysis.name == name
    settings = settings_from_config(ANALYSES[name][1], cfg.analysis)
    assert settings.seed == 0


def test_rank_correlation_and_split_means_match_the_formulas() -> None:
    values = [0.3, 0.1, 0.5, 0.2, 0.9, None]
    counts = [10, 20, 30, 40, 50, 60]
    a, b = values[:5], counts[:5]  # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    ra = {v: r for r, v in enumerate(sorted(a))}
    rb = {v: r for r, v in enumerate(sorted(b))}
    d2 = sum((ra[x] - rb[y]) ** 2 for x, y in zip(a, b))
    assert rank_correlation(values, counts) == pytest.approx(1 - 6 * d2 / (5 * 24))
    assert rank_correlation([1.0, 1.0, 1.0], [1, 2, 3]) is None
    means = split_means(values, ["many", "many", "medium", "few", "few", "few"])
    assert means == pytest.approx({"many": 0.2, "medium": 0.5, "few": 0.55})


# ----------------------------------------------------------------------------------------------
# Pruning


def test_magnitude_pruning_zeroes_exactly_the_smallest_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((7, 5), (13,), (3, 2, 2))
    ]
    n = sum(p.numel() for p in params)
    for fraction in (0.1, 0.37, 0.5):
        ps = [p.clone() for p in params]
        stats = magnitude_prune_(ps, fraction)
        k = math.floor(fraction * n + 0.5)
        assert stats.n_pruned == k and stats.n_ranked == n
        zeroed = torch.cat([(a != b).flatten() for a, b in zip(ps, params)])
        before = torch.cat([p.abs().flatten() for p in params])
        assert int(zeroed.sum()) == k
        assert before[zeroed].max() <= before[~zeroed].min()  # global, not per tensor
        assert stats.threshold == pytest.approx(float(before.sort().values[k - 1]))
    # Ties at the cut: the count is still exact.
    tied = [torch.ones(10, dtype=torch.float64), torch.full((10,), 2.0, dtype=torch.float64)]
    assert magnitude_prune_(tied, 0.25).n_pruned == 5
    assert int((tied[0] == 0).sum()) == 5 and torch.all(tied[1] == 2.0)
    untouched = [p.clone() for p in params]
    assert magnitude_prune_(untouched, 0.0).n_pruned == 0
    assert all(torch.equal(a, b) for a, b in zip(untouched, params))


def test_prune_scope_of_a_cm_model() -> None:
    model = reserve_capacity(tiny_unet(), rank_ratio=0.5, layers="up")
    weights = dict(prunable_parameters(model, "conv_linear_weights"))
    assert weights and not any(is_lowrank_param(n) for n in weights)
    assert all(n.endswith(".weight") and p.ndim >= 2 for n, p in weights.items())
    assert "label_emb.weight" not in weights  # an Embedding, not a Conv2d / Linear
    everything = dict(prunable_parameters(model, "all"))
    assert set(weights) < set(everything) and any(is_lowrank_param(n) for n in everything)


def test_pruning_sensitivity_matches_a_direct_recomputation() -> None:
    model, schedule = tiny_unet(), schedule64()
    samples = synthetic_samples([5, 3, 2], draws=2, seed=1)
    state = copy.deepcopy(model.state_dict())

    zero = pruning_sensitivity(model, schedule, samples, 0.0)
    assert zero["relative_change"] == [0.0, 0.0, 0.0] and zero["prune"]["n_pruned"] == 0

    res = pruning_sensitivity(model, schedule, samples, 0.3, batch_size=4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # raw untouched
    # The test's own pruned copy: sort every conv / linear weight entry, zero the 30% smallest.
    pruned = copy.deepcopy(model)
    ws = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flat = torch.cat([w.detach().abs().flatten() for w in ws])
    k = round(0.3 * flat.numel())
    cut = flat.sort().values[k - 1]
    with torch.no_grad():
        for w in ws:
            w[w.abs() <= cut] = 0.0
    assert res["prune"]["n_pruned"] == k == sum(int((w == 0).sum()) for w in ws)
    with torch.no_grad():
        for c in range(3):
            items = sample_list(samples, c)
            raw = sum(float(mse64(model, schedule, b)) for b in items) / len(items)
            after = sum(float(mse64(pruned, schedule, b)) for b in items) / len(items)
            assert res["loss_raw"][c] == pytest.approx(raw, rel=1e-10)
            assert res["loss_pruned"][c] == pytest.approx(after, rel=1e-10)
            assert res["relative_change"][c] == pytest.approx((after - raw) / raw, rel=1e-8)
    assert res["n_samples"] == [10, 6, 4]


# ----------------------------------------------------------------------------------------------
# Bottleneck overlap


def test_knn_purity_is_one_for_separated_clusters_and_chance_for_random_labels() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 100.0
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 10, 5]))
    feats = centres[labels] + torch.randn(len(labels), 4, generator=g)
    for metric in ("cosine", "euclidean"):
        purity, neigh = knn_label_purity(feats, labels, k=4, metric=metric)
        assert torch.all(purity == 1.0)
        matrix = overlap_matrix(labels, neigh, 4)
        assert torch.equal(matrix, torch.eye(4, dtype=torch.float64))

    # Random features: purity of class c near its chance level (n_c - 1) / (N - 1).
    labels = torch.arange(4).repeat_interleave(torch.tensor([600, 400, 200, 100]))
    feats = torch.randn(len(labels), 8, generator=g)
    purity, neigh = knn_label_purity(feats, labels, k=10, metric="euclidean")
    per_class = per_class_purity(purity, labels, 4)
    chance = chance_purity(labels, 4)
    assert chance == pytest.approx([599 / 1299, 399 / 1299, 199 / 1299, 99 / 1299])
    for got, want in zip(per_class, chance):
        assert abs(got - want) < 0.04
    matrix = overlap_matrix(labels, neigh, 4)
    assert torch.allclose(matrix.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(matrix.diagonal(), torch.tensor(per_class, dtype=torch.float64))


def test_knn_indices_match_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(30, 5, generator=g)
    for metric in ("cosine", "euclidean"):
        got = knn_indices(feats, 3, metric, chunk=7)
        x = feats.double()
        for i in range(30):
            if metric == "cosine":
                d = [1 - float(x[i] @ x[j] / (x[i].norm() * x[j].norm())) for j in range(30)]
            else:
                d = [float((x[i] - x[j]).norm()) for j in range(30)]
            d[i] = math.inf
            assert got[i].tolist() == sorted(range(30), key=d.__getitem__)[:3]
    with pytest.raises(ValueError, match="k \\+ 1"):
        knn_indices(feats[:3], 3)


def test_pooled_features_are_the_mean_of_the_bottleneck_map() -> None:
    model, schedule = tiny_unet(), schedule64()
    samples = synthetic_samples([3, 2, 1], t=20)
    feats, labels = pooled_bottleneck_features(model, schedule, samples, "label", batch_size=2)
    assert feats.shape == (6, model.bottleneck_channels) and labels.tolist() == [0, 0, 0, 1, 1, 2]
    b = next(samples.batches(1, 8, "cpu", torch.float64))
    x_t = schedule.q_sample(b.x0, b.t, b.noise)
    with torch.no_grad():
        _, h = model(x_t, b.t, b.y, return_bottleneck=True)
    assert torch.allclose(feats[3:5], h.mean(dim=(2, 3)).float())


# ----------------------------------------------------------------------------------------------
# Gradient dominance


def _direct_dominance(model, schedule, samples, counts, splits, majority, minority):
    """Theorem 2.1's test per parameter matrix, from per-sample float64 gradients."""
    params = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    for _, p in params:
        p.requires_grad_(True)
    grads = {}
    for c in range(len(counts)):
        items = sample_list(samples, c)
        acc = [torch.zeros_like(p) for _, p in params]
        for b in items:  # one sample at a time
            gs = torch.autograd.grad(mse64(model, schedule, b), [p for _, p in params],
                                     allow_unused=True)  # fmt: skip
            for a, g in zip(acc, gs):
                if g is not None:
                    a += g / len(items)
        grads[c] = acc
    C = len(counts)
    total = [sum(counts[c] * grads[c][i] for c in range(C)) for i in range(len(params))]
    maj = [sum(counts[c] * grads[c][i] for c in range(C) if splits[c] in majority)
           for i in range(len(params))]  # fmt: skip
    mnr = [sum(counts[c] * grads[c][i] for c in range(C) if splits[c] in minority)
           for i in range(len(params))]  # fmt: skip

    def tol(family):  # a norm below 100 eps x the family's largest is rounding noise
        return 100 * torch.finfo(torch.float64).eps * max(float(x.norm()) for x in family)

    def cos(a, b, ta, tb):
        na, nb = a.norm(), b.norm()
        return None if na <= ta or nb <= tb else float((a * b).sum() / (na * nb))

    tt, tm, tn = tol(total), tol(maj), tol(mnr)
    dominated, over = {}, {c: {} for c in range(C)}
    for i, (name, _) in enumerate(params):
        cm, cn = cos(total[i], maj[i], tt, tm), cos(total[i], mnr[i], tt, tn)
        dominated[name] = None if cm is None or cn is None else cm > cn
        for c in range(C):
            cc = cos(total[i], grads[c][i], tt, tol(grads[c]))
            over[c][name] = None if cm is None or cc is None else cm > cc
    for _, p in params:
        p.requires_grad_(False)
    return dominated, over


def _frac(flags):
    vals = [f for f in flags if f is not None]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("cm", [False, True], ids=["ddpm", "cm"])
def test_gradient_dominance_matches_a_direct_recomputation(cm: bool) -> None:
    # One channel per GroupNorm group (32 groups at 32 channels): the norm after a level-0
    # time projection removes its shift, so that tensor's gradient is zero up to rounding.
    model = tiny_unet(num_classes=3, seed=2, norm_group_min_channels=1)
    if cm:
        reserve_capacity(model, rank_ratio=0.5, layers="up")
        with torch.no_grad():  # a trained CM model has B != 0 (B = 0 would zero A's gradient)
            for name, p in model.named_parameters():
                if name.endswith("lowrank_B"):
                    p.normal_(0.0, 0.1)
    model.requires_grad_(False)
    schedule, samples = schedule64(), synthetic_samples([6, 3, 2], draws=1, seed=3)
    counts, splits = [60, 20, 5], ["many", "medium", "few"]
    res = gradient_dominance(model, schedule, samples, counts, splits, batch_size=4)
    dominated, over = _direct_dominance(
        model, schedule, samples, counts, splits, ("many",), ("few",)
    )
    assert not any(p.requires_grad for p in model.parameters())  # restored
    rows = {r["name"]: r for r in res["per_tensor"]}
    assert set(rows) == set(dominated)
    # That zero-up-to-rounding gradient counts as undefined.
    assert rows["down.0.temb_proj.weight"]["dominated"] is None
    assert {n: r["dominated"] for n, r in rows.items()} == dominated
    assert res["majority_ratio"] == pytest.approx(60 / 65)
    parts = {"all": list(dominated)}
    if cm:
        parts["theta_g"] = [n for n in dominated if not is_lowrank_param(n)]
        parts["lowrank"] = [n for n in dominated if is_lowrank_param(n)]
        assert len(parts["lowrank"]) == 2 * sum(1 for n in dominated if n.endswith("lowrank_A")) > 0
    assert set(res["parts"]) == set(parts)
    for part, names in parts.items():
        summary = res["parts"][part]
        assert summary["n_tensors"] == len(names)
        want = _frac([dominated[n] for n in names])
        assert 0.0 <= summary["dominated_fraction"] <= 1.0
        assert summary["dominated_fraction"] == pytest.approx(want)
        got = res["per_class"]["overwhelmed_fraction"][part]
        assert got[0] is None  # the majority's own class
        for c in (1, 2):
            assert got[c] == pytest.approx(_frac([over[c][n] for n in names]))


def test_gradient_dominance_needs_both_groups() -> None:
    model = tiny_unet()
    model.requires_grad_(False)
    samples = synthetic_samples([3, 2, 1])
    with pytest.raises(ValueError, match="minority splits"):
        gradient_dominance(model, schedule64(), samples, [3, 2, 1], ["many", "many", "medium"])


# ----------------------------------------------------------------------------------------------
# IMBA distance


def test_imba_distance_per_class_is_the_mean_over_the_class() -> None:
    imba = pytest.importorskip("lt_diffusion.methods.imba")
    from lt_diffusion.analysis.imba_distance import mean_imba_distances

    model, schedule = tiny_unet(), schedule64()
    samples = synthetic_samples([4, 2, 1], draws=2, t=T - 1)
    got = mean_imba_distances(model, schedule, samples, "class", gamma=0.8, batch_size=3)
    with torch.no_grad():
        for c in range(3):
            vals = []
            for b in sample_list(samples, c):
                assert torch.all(b.t == T - 1) and len(b.t) == 2  # one image, two draws
                x_t = schedule.q_sample(b.x0, b.t, b.noise)
                eps_u = model(x_t, b.t, torch.full_like(b.y, model.null_label))
                d = imba.imba_distance(b.noise, eps_u, gamma=0.8, granularity="token")
                assert d.shape == (2, 8, 8)
                vals += d.mean(dim=(1, 2)).tolist()
            assert got[c] == pytest.approx(sum(vals) / len(vals), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# The command, on tiny trained checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few training steps of DDPM and of CM (DDPM base) on a tiny CIFAR-10-LT."""
    from lt_diffusion import train
    from tests.fakedata import write_cifar10

    tmp = tmp_path_factory.mktemp("analyses")
    write_cifar10(tmp / "data" / "cifar10", n_per_class=20, test_per_class=4, seed=0)
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("ddpm", "cm_ddpm"):
            run_dir = tmp / "runs" / method
            cfg = compose_config(
                "train",
                [
                    "dataset=cifar10_lt", "imbalance=ir10", "model=unet_tiny", "trainer=cpu",
                    "logger=none", f"paths.data_root={tmp / 'data'}",
                    f"paths.output_dir={tmp / 'outputs'}", f"paths.run_dir={run_dir}",
                    "dataset.source.download=false", "data.batch_size=8",
                    "train.warmup_steps=1", "train.ckpt_every=3", "train.grid_every=0",
                    "train.grid_per_class=1", "train.grid_steps=2", "train.log_every=3",
                    "train.max_steps=3", f"method={method}",
                ],
            )  # fmt: skip
            train.run(cfg)
            out[method] = run_dir / "checkpoints" / "last.ckpt"
    finally:
        torch.set_num_threads(before)
    return out


def _analyze(ckpt: Path, name: str, *extra: str) -> dict:
    from lt_diffusion import analyze

    cfg = compose_config(
        "analyze",
        [f"analysis={name}", f"checkpoint={ckpt}", "device=cpu", "progress=false",
         "batch_size=64", *extra],
    )  # fmt: skip
    return analyze.run(cfg)


def _check_files(ckpt: Path, stem: str) -> dict:
    folder = ckpt.parent.parent / "analyses"
    record = json.loads((folder / f"{stem}.json").read_text())  # strict JSON: no NaN
    assert Image.open(folder / f"{stem}.png").size[0] > 100
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary file
    return record


def test_pruning_command_writes_record_and_plot(trained) -> None:
    ckpt = trained["ddpm"]
    rec = _analyze(ckpt, "pruning", "analysis.fraction=0.0", "analysis.images_per_class=3",
                   "analysis.draws=1", "ema=false")  # fmt: skip
    saved = _check_files(ckpt, "pruning")
    assert saved == json.loads(json.dumps(rec))
    counts = saved["dataset"]["class_counts"]
    assert counts[0] == 20 and counts[-1] == 2 and len(saved["dataset"]["splits"]) == 10
    assert saved["checkpoint"]["path"] == str(ckpt.resolve()) and saved["checkpoint"]["step"] == 3
    assert saved["settings"]["fraction"] == 0.0 and saved["config"]["method"]["name"] == "ddpm"
    res = saved["results"]
    assert res["relative_change"] == [0.0] * 10  # nothing pruned: exactly no change
    assert res["n_samples"] == [min(3, n) for n in counts]
    assert res["prune"]["n_pruned"] == 0

    rec = _analyze(ckpt, "pruning", "analysis.fraction=0.5", "analysis.images_per_class=2",
                   "analysis.draws=1", "ema=false")  # fmt: skip
    pr = rec["results"]["prune"]
    assert pr["n_pruned"] == math.floor(0.5 * pr["n_ranked"] + 0.5)
    assert any(v != 0.0 for v in rec["results"]["relative_change"])


def test_overlap_and_dominance_commands_on_ddpm_and_cm(trained) -> None:
    ckpt = trained["ddpm"]
    rec = _analyze(ckpt, "feature_overlap", "analysis.k=3", "analysis.images_per_class=4")
    res = _check_files(ckpt, "feature_overlap")["results"]
    assert len(res["purity"]) == 10 and all(0.0 <= p <= 1.0 for p in res["purity"])
    assert len(res["overlap_matrix"]) == 10 and rec["results"]["t"] == 500

    for method in ("ddpm", "cm_ddpm"):
        ckpt = trained[method]
        _analyze(ckpt, "gradient_dominance", "analysis.images_per_class=2")
        res = _check_files(ckpt, "gradient_dominance")["results"]
        want = {"all", "theta_g", "lowrank"} if method == "cm_ddpm" else {"all"}
        assert set(res["parts"]) == want
        for summary in res["parts"].values():
            assert 0.0 <= summary["dominated_fraction"] <= 1.0 and summary["n_defined"] > 0
        if method == "cm_ddpm":
            n_low = sum(r["part"] == "lowrank" for r in res["per_tensor"])
            assert res["parts"]["lowrank"]["n_tensors"] == n_low > 0
            assert res["parts"]["theta_g"]["n_tensors"] + n_low == res["parts"]["all"]["n_tensors"]


def test_imba_command(trained) -> None:
    pytest.importorskip("lt_diffusion.methods.imba")
    ckpt = trained["ddpm"]
    rec = _analyze(ckpt, "imba_distance", "analysis.images_per_class=2", "analysis.draws=1")
    res = _check_files(ckpt, "imba_distance")["results"]
    assert rec["results"]["t"] == 999 and len(res["distance"]) == 10
    assert all(d is not None and d > 0 for d in res["distance"])


def test_command_errors_come_before_any_work(trained, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        _analyze(tmp_path / "missing.ckpt", "pruning", "analysis.fraction=1.0")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        _analyze(tmp_path / "missing.ckpt", "pruning")
    with pytest.raises(ValueError, match="without theta_g_only"):
        _analyze(tmp_path / "missing.ckpt", "gradient_dominance", "theta_g_only=true")
    with pytest.raises(ValueError, match="CM checkpoints only"):
        _analyze(trained["ddpm"], "pruning", "theta_g_only=true")
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        _analyze(trained["ddpm"], "feature_overlap", "analysis.t=1000")
    with pytest.raises(ValueError, match=r"not a text-to-image model .*model=sd_lora"):
        _analyze(trained["ddpm"], "concept_dominance")
