"""The IMBA paper's causal claim on a CPU: the synthetic two-concept data (exact pair counts at
the paper's ratios and scales, the success decision against a brute-force one), the
concept-pair model, the token-level IMBA and frequency-based weights against float64
recomputations, the composition and IMBA-distance analyses, and the refusals."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from lt_diffusion.data.concept_pairs import (
    ConceptPairSource,
    circle_concepts,
    class_pairs,
    pair_counts,
    pair_name,
    parse_pair_name,
)
from lt_diffusion.methods import FrequencyBalancedObjective, IMBAObjective
from lt_diffusion.methods.imba import inverse_frequency, token_view, token_weights
from lt_diffusion.models import ConceptPairMLP
from lt_diffusion.tables import load_table_by_name
from tests.conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = (2, 8)
NAMES = [pair_name(a, b) for a, b in class_pairs(SIZES)]


# ----------------------------------------------------------------------------------------------
# The data: exact counts at the paper's ratios and scales


PAPER = ROOT.parent / "shared" / "papers" / "imba_loss_iccv2025.txt"


def _k(text: str) -> int:
    """``3K`` -> 3000, ``0.03K`` -> 30."""
    return round(float(text.rstrip("K")) * 1000)


def _paper_causal_rows() -> list[tuple[str, int, int, int]]:
    """The paper's causal table: (pair, head images, tail images, ratio) per row."""
    if not PAPER.is_file():
        pytest.skip(f"the paper's text is not at {PAPER} (outside the repository)")
    rows = re.findall(
        r"^(piano-submarine|volcano-twins) \([a-z ]+\) (\S+K) (\S+K) (\d+):1 \d+% 0\.\d+$",
        PAPER.read_text(), re.MULTILINE,
    )  # fmt: skip
    assert len(rows) == 6
    return [(pair, _k(head), _k(tail), int(ratio)) for pair, head, tail, ratio in rows]


@functools.cache
def _causal_spec_rows() -> list[tuple[tuple[str, int, int, int], list[str]]]:
    """table=imba_pairs_causal's rows: the setting their labels name (pair, head, tail,
    ratio) and the training overrides of their seed-1 run (seed 1 redraws the data)."""
    spec = load_table_by_name("imba_pairs_causal")
    out = []
    for block in spec.blocks:
        ratio, pair = re.fullmatch(r"(\d+):1 \((\S+)\)", block.label).groups()
        for row in block.rows:
            head, tail, balanced = re.fullmatch(
                r"(\S+K) / (\S+K)( \(balanced\))?", row.label
            ).groups()
            setting = (pair, _k(head), _k(tail), 1 if balanced else int(ratio))
            run = spec.run_ref(row.experiments["tail"], 1, row.overrides)
            out.append((setting, run.train_overrides()))
    return out


@pytest.mark.parametrize("i", range(6))
def test_each_causal_row_keeps_the_papers_counts_exactly(i: int) -> None:
    """Row ``i`` of table=imba_pairs_causal is the paper's causal row ``i`` (pair, head and
    tail counts, ratio), and the datamodule its run builds keeps exactly that many samples per
    head and tail concept, spread evenly over the two positions, every pair at least one."""
    from hydra.utils import instantiate

    paper, spec_rows = _paper_causal_rows(), _causal_spec_rows()
    assert [setting for setting, _ in spec_rows] == paper  # the same rows, in the paper's order
    (_, head, tail, _), overrides = spec_rows[i]
    dm = instantiate(compose_config("train", overrides).data, sampler="uniform", on_device=False)
    dm.setup()
    counted = torch.bincount(dm.train_labels, minlength=16).tolist()
    assert counted == dm.class_counts
    per_concept_b = [0] * 8
    for name, k in zip(dm.class_names, counted):
        per_concept_b[parse_pair_name(name)[1]] += k
    assert per_concept_b == [head] * 4 + [tail] * 4
    assert counted == [head // 2] * 8 + [tail // 2] * 8  # each concept in both positions
    assert min(counted) >= 1 and sum(counted) == 4 * (head + tail)


def test_a_setting_leaving_a_pair_without_samples_is_refused_before_training(tmp_path) -> None:
    """Ratio 100 at 50 samples per head pair gives the tail pairs int(0.5) = 0 samples: the
    run stops when its data are built, before a step or a file."""
    from lt_diffusion import train

    with pytest.raises(ValueError, match=r"a0\+b4, a1\+b4.* without a training sample"):
        pair_counts(50, SIZES, "step", 100)
    cfg = compose_config("train", [
        "experiment=imba/pairs_plain", "dataset.source.n_per_class=50", "logger=none",
        f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    with pytest.raises(ValueError, match="Raise dataset.source.n_per_class to at least 100"):
        train.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert pair_counts(50, SIZES, "exp", 50)[-1] == 1  # the exponential profile likewise


def test_the_success_decision_is_the_brute_force_one() -> None:
    """``shown`` / ``composes`` against a loop over every token and concept in float64, on
    points drawn near the concepts, between them, on the hit spheres' edges and far away."""
    rule = circle_concepts((3, 4), radius=0.7, std=0.05)
    rng = np.random.default_rng(0)
    pts = []
    for _ in range(400):  # each token: near a concept, at its ball's edge, or anywhere
        row = []
        for means in rule.means:
            m = means[rng.integers(len(means))]
            kind = rng.integers(3)
            if kind == 0:
                row.append(m + rng.normal(0, 0.05, 2))
            elif kind == 1:
                u = rng.normal(size=2)
                row.append(m + u / np.linalg.norm(u) * rule.hit_radius * rng.choice([0.999, 1.001]))
            else:
                row.append(rng.uniform(-1, 1, 2))
        pts.append(np.concatenate(row))
    pts = np.asarray(pts)
    shown = rule.shown(pts)
    for i, p in enumerate(pts):
        for v, means in enumerate(rule.means):
            token = p[2 * v : 2 * v + 2]
            inside = [k for k, m in enumerate(means)
                      if math.dist(token, m) <= rule.hit_radius]  # fmt: skip
            assert len(inside) <= 1
            assert shown[i, v] == (inside[0] if inside else -1)
    for a in range(3):
        for b in range(4):
            want = [shown[i, 0] == a and shown[i, 1] == b for i in range(len(pts))]
            assert rule.composes(pts, (a, b)).tolist() == want
    assert (shown >= 0).any(0).all() and (shown == -1).any(0).all()  # both outcomes exercised
    with pytest.raises(ValueError, match="overlap"):
        circle_concepts((2, 40), radius=0.7, std=0.05)


def test_true_draws_compose_at_the_hit_quantile_squared() -> None:
    rule = circle_concepts(SIZES)
    n = 40000
    rate = rule.composes(rule.sample((1, 6), n, np.random.default_rng(1)), (1, 6)).mean()
    q = rule.hit_quantile**2
    assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / n)


def test_source_draws_the_same_pool_for_the_same_seed() -> None:
    a, b = ConceptPairSource(n_per_class=20, seed=3), ConceptPairSource(n_per_class=20, seed=3)
    np.testing.assert_array_equal(a.load("train").points, b.load("train").points)
    other = ConceptPairSource(n_per_class=20, seed=4).load("train").points
    assert not np.array_equal(a.load("train").points, other)
    test = a.load("test")
    assert np.bincount(test.labels).tolist() == [500] * 16
    assert test.points.dtype == np.float32 and np.abs(test.points).max() < 1.0


# ----------------------------------------------------------------------------------------------
# The model: E_A[a] + E_B[b]


def _model(**kw) -> ConceptPairMLP:
    torch.manual_seed(0)
    return ConceptPairMLP(4, 16, SIZES, NAMES, ch=8, emb_mult=2, **kw).double()


def test_the_model_sees_the_two_concepts_separately() -> None:
    model = _model()
    y = torch.tensor([0, 9, 16])  # (a0, b0), (a1, b4), null
    torch.testing.assert_close(model.pair_index[y], torch.tensor([[0, 0], [1, 4], [2, 8]]))
    temb = torch.zeros(3, 16, dtype=torch.float64)
    want = torch.stack([
        model.concept_emb[0].weight[a] + model.concept_emb[1].weight[b]
        for a, b in ((0, 0), (1, 4), (2, 8))
    ])  # fmt: skip
    torch.testing.assert_close(model.add_labels(temb, y, None), want)
    # The gradient of a sample of (a1, b4) reaches only rows a1 and b4 (and never the others).
    x, t = torch.randn(1, 4, dtype=torch.float64), torch.tensor([500])
    model(x, t, torch.tensor([9])).square().sum().backward()
    rows = [set(torch.nonzero(e.weight.grad.abs().sum(1)).flatten().tolist())
            for e in model.concept_emb]  # fmt: skip
    assert rows == [{1}, {4}]
    counts = model.concept_counts(list(range(1, 17)))
    assert counts[:2].tolist() == [sum(range(1, 17, 2)), sum(range(2, 17, 2))]
    assert counts[2 + 4].tolist() == 9 + 10


def test_the_pair_table_travels_with_the_checkpoint_and_names_are_checked() -> None:
    model = _model()
    shuffled = list(reversed(NAMES))
    model.set_class_names(shuffled)
    fresh = ConceptPairMLP(4, 16, SIZES, None, ch=8, emb_mult=2).double()
    with pytest.raises(RuntimeError, match="set_class_names"):
        fresh(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([1]), torch.tensor([0]))
    fresh.load_state_dict(model.state_dict())
    assert fresh.class_names == shuffled
    torch.testing.assert_close(fresh.pair_index[0], torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="not a concept pair"):
        model.set_class_names(["piano"] * 16)
    with pytest.raises(ValueError, match="outside the model's vocabularies"):
        model.set_class_names([pair_name(0, 9)] * 16)


# ----------------------------------------------------------------------------------------------
# The weights: one per token (IMBA distance or counted inverse frequency)


def _loss_reference(model, objective, x0, y, sched, weight_of):
    """The IMBA-form loss recomputed in float64 with per-token weights ``weight_of(eps, eps_u)``
    (B, 2), tokens being coordinates (0, 1) and (2, 3)."""
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (len(y),))
    eps = torch.randn_like(x0)
    abar = sched.alphas_cumprod[t].view(-1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_c = model(x_t, t, y)
    eps_u = model(x_t, t, torch.full_like(y, 16))
    w = weight_of(eps, eps_u.detach())
    err = torch.stack([((eps - eps_c)[:, 2 * k : 2 * k + 2] ** 2).mean(1) for k in range(2)], 1)
    if objective.granularity == "sample":
        w, err = w.mean(1), err.mean(1)
    cond = (w * err).mean()
    return objective.lam * cond + (1 - objective.lam) * ((eps - eps_u) ** 2).mean()


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_imba_weights_each_token_by_its_own_distance(sched, granularity) -> None:
    model, objective = _model(), IMBAObjective(gamma=0.8, lam=0.9, granularity=granularity)
    objective.setup([10] * 16)
    g = torch.Generator().manual_seed(1)
    x0, y = (
        torch.rand(6, 4, generator=g, dtype=torch.float64) - 0.5,
        torch.tensor([0, 3, 8, 9, 15, 2]),
    )
    torch.manual_seed(3)
    got = objective(model, x0, y, sched).loss

    def distance(eps, eps_u):
        d = (eps - eps_u).abs() ** 0.8
        return torch.stack([d[:, 0:2].mean(1), d[:, 2:4].mean(1)], 1)

    ref = _loss_reference(model, objective, x0, y, sched, distance)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-9)
    assert token_view(torch.arange(8.0).view(2, 4), 2)[0].tolist() == [[0.0, 2.0], [1.0, 3.0]]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_frequency_based_weights_are_the_counted_inverse_frequencies(sched, alpha) -> None:
    model = _model()
    objective = FrequencyBalancedObjective(alpha=alpha, lam=0.9)
    counts = [30] * 8 + [3] * 8  # head pairs (b0..b3) 30, tail pairs 3
    objective.setup(counts)
    y = torch.tensor([0, 3, 8, 9, 15, 2])
    x0 = torch.rand(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5
    torch.manual_seed(3)
    got = objective(model, x0, y, sched).loss

    # By hand: vocabulary A has 2 concepts in 132 samples each; B has 4 in 60 and 4 in 6.
    def phi_weights(n):
        phi = np.asarray(n, dtype=float) / sum(n)
        return phi**-alpha / (phi ** (1 - alpha)).sum()

    w_a, w_b = phi_weights([132, 132]), phi_weights([60] * 4 + [6] * 4)
    assert (phi_weights([60] * 4 + [6] * 4) * np.asarray([60] * 4 + [6] * 4) / 264).sum() == (
        pytest.approx(1.0)
    )  # mean weight 1 over the training samples

    def weights(eps, eps_u):
        pairs = [parse_pair_name(NAMES[int(c)]) for c in y]
        return torch.tensor([[w_a[a], w_b[b]] for a, b in pairs], dtype=torch.float64)

    ref = _loss_reference(model, objective, x0, y, sched, weights)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-9)


def test_inverse_frequency_and_caption_strip_weights() -> None:
    w = inverse_frequency(torch.tensor([90.0, 10.0, 0.0]), [3])
    assert w.tolist() == pytest.approx([100 / 180, 100 / 20, 0.0])  # 1 / (K phi) of the seen
    with pytest.raises(ValueError, match="do not fit"):
        inverse_frequency(torch.tensor([1.0, 2.0]), [3])
    per_class = torch.tensor([0.5, 2.0, 4.0])
    like = torch.zeros(2, 4, 3, 5)  # (B, C, H, W): two strips of width 2 and 3
    got = token_weights(per_class, torch.tensor([[0, 2], [1, 1]]), like)
    assert got.shape == (2, 3, 5)
    assert got[0, 1].tolist() == [0.5, 0.5, 4.0, 4.0, 4.0] and got[1].unique().tolist() == [2.0]
    single = token_weights(per_class, torch.tensor([2, 0]), like)
    assert single[0].unique().tolist() == [4.0] and single[1].unique().tolist() == [0.5]


# ----------------------------------------------------------------------------------------------
# The analyses, on a short trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """40 steps of the IMBA loss on the synthetic data at 100:1 (a small pool)."""
    from lt_diffusion import train

    tmp = tmp_path_factory.mktemp("pairs")
    cfg = compose_config("train", [
        "experiment=imba/pairs_imba", "dataset.source.n_per_class=200", "train.max_steps=40",
        "train.warmup_steps=5", "train.ckpt_every=40", "train.grid_per_class=2",
        "train.grid_steps=2", "data.batch_size=64", f"paths.output_dir={tmp}",
        f"paths.run_dir={tmp / 'run'}",
    ])  # fmt: skip
    train.run(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt"


def _analyze(ckpt: Path, *overrides: str) -> dict:
    from lt_diffusion import analyze

    return analyze.run(compose_config("analyze", [f"checkpoint={ckpt}", "device=cpu",
                                                  "progress=false", *overrides]))  # fmt: skip


def test_composition_record_is_the_rule_applied_to_its_samples(trained) -> None:
    from lt_diffusion.analysis.composition import validate

    rec = _analyze(trained, "analysis=composition", "analysis.samples_per_pair=30",
                   "analysis.steps=5")  # fmt: skip
    res = validate(
        json.loads((trained.parent.parent / "analyses" / "composition.json").read_text())
    )
    assert res["results"]["success"] == rec["results"]["success"]
    rule = circle_concepts(SIZES)
    tail, head = [], []
    for e in rec["results"]["pairs"]:
        pts = np.asarray(rec["results"]["examples"][e["pair"]])  # all 30 samples
        a, b = parse_pair_name(e["pair"])
        ok = [math.dist(p[:2], rule.means[0][a]) <= rule.hit_radius
              and math.dist(p[2:], rule.means[1][b]) <= rule.hit_radius for p in pts]  # fmt: skip
        assert e["success"] == pytest.approx(np.mean(ok), abs=1e-4)  # examples are rounded
        (tail if b >= 4 else head).append(e["success"])
        assert e["count"] == (200 if b < 4 else 2)
    assert rec["results"]["success"]["tail"] == pytest.approx(np.mean(tail))
    assert rec["results"]["success"]["head"] == pytest.approx(np.mean(head))
    assert (trained.parent.parent / "analyses" / "composition.png").stat().st_size > 0


def test_imba_distance_per_concept_and_its_fit(trained) -> None:
    from lt_diffusion.analysis.imba_distance import frequency_fit

    rec = _analyze(trained, "analysis=imba_distance", "analysis.gamma=1.0",
                   "analysis.images_per_class=3", "analysis.draws=2")  # fmt: skip
    fit = rec["results"]["vs_frequency"]
    assert fit["unit"] == "concept" and fit["names"][:3] == ["a0", "a1", "b0"]
    assert fit["count"] == [808.0, 808.0] + [400.0] * 4 + [4.0] * 4
    # Recompute the per-concept distances by hand from the model (float64) on the same draws.
    from lt_diffusion.analysis.common import load_analysed_run

    run = load_analysed_run(trained, "cpu")
    run.model.double()
    samples = run.samples(3, 2, 0, run.schedule.num_timesteps - 1)
    sums, ns = np.zeros(10), np.zeros(10)
    with torch.no_grad():
        for c in range(16):
            a, b = parse_pair_name(run.info["class_names"][c])
            for batch in samples.batches(c, 1, "cpu", torch.float64):
                x_t = run.schedule.q_sample(batch.x0, batch.t, batch.noise)
                for d in (batch.noise - run.model(x_t, batch.t, None)).abs():  # each draw
                    for concept, token in ((a, d[:2]), (2 + b, d[2:])):
                        sums[concept] += float(token.mean())
                        ns[concept] += 1
    np.testing.assert_allclose(fit["distance"], sums / ns, rtol=1e-4)
    # The fit against an independent computation (numpy's least squares, scipy's Spearman).
    vals = np.asarray(fit["distance"])
    inv = 1 / np.asarray(fit["count"])
    slope = np.polyfit(np.log(inv), np.log(vals), 1)[0]
    assert fit["loglog_slope"] == pytest.approx(slope, rel=1e-9)
    assert fit["spearman"] == pytest.approx(stats.spearmanr(vals, inv).statistic)
    assert fit["slope_low"] < slope < fit["slope_high"]
    exact = frequency_fit([1.0, 2.0, 4.0, None], [8, 4, 2, 1], list("abcd"), "class")
    assert exact["loglog_slope"] == pytest.approx(1.0) and exact["n"] == 3
    assert exact["slope_low"] == pytest.approx(1.0) and exact["spearman"] == pytest.approx(1.0)


def test_composition_analysis_refuses_other_datasets_and_bad_settings(trained) -> None:
    from lt_diffusion.analysis.composition import CompositionSettings

    with pytest.raises(ValueError, match="samples_per_pair must be an integer >= 1"):
        CompositionSettings(samples_per_pair=0)
    with pytest.raises(ValueError, match="analysis.t must be a timestep, null .* or 'uniform'"):
        _analyze(trained, "analysis=imba_distance", "analysis.t=later")


def test_the_concept_pair_model_without_its_dataset_says_what_it_needs() -> None:
    from lt_diffusion.runs.build import build_model

    cfg = compose_config("train", ["experiment=toy/toy2d_ddpm", "model=concept_pair_mlp"])
    with pytest.raises(ValueError, match="use it with dataset=concept_pairs"):
        build_model(cfg)
