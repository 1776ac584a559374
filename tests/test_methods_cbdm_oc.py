"""CBDM and OC objectives against independent float64 recomputations of their formulas, the
label / reference draws they make, and a short training run of each."""

from __future__ import annotations

import math

import pytest
import torch

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods import (
    CBDMObjective,
    DDPMObjective,
    OCObjective,
    Step,
    oc_gate,
    oc_selection_probs,
)
from tests.objectives import AlwaysDrop, T, TinyNet, abar_of, draw_labels, toy_batch, train_losses

COUNTS = [5, 3, 1]  # training images per class; class 0 the head
pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [model.w, model.b]))


# ----------------------------------------------------------------------------------------------
# CBDM


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("target_dist", ["empirical", "uniform", "inverse"])
def test_cbdm_loss_and_gradients_equal_formula(sched, fused: bool, target_dist: str) -> None:
    obj = CBDMObjective(
        tau=1.0, gamma=0.25, target_dist=target_dist, fused_forward=fused, cond_drop_prob=0.0
    )
    obj.setup(COUNTS)
    model = TinyNet()
    x0, y = toy_batch()
    torch.manual_seed(3)
    out = obj(model, x0, y, sched)
    got = _grads(model, out.loss)

    # Independent recomputation, same random draws: t, eps, then y'.
    torch.manual_seed(3)
    t = torch.randint(0, T, (6,))
    eps = torch.randn_like(x0)
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    weights = {"empirical": counts, "uniform": torch.ones(3), "inverse": 1.0 / counts}
    probs = weights[target_dist] / weights[target_dist].sum()
    y_bal = draw_labels(probs, 6)
    abar = abar_of(t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    h, h_bal = model.formula(x_t, t, y), model.formula(x_t, t, y_bal)
    w = (t.double() / T)[:, None, None, None]
    ddpm = ((h - eps) ** 2).mean()
    reg = (w * (h - h_bal.detach()) ** 2).mean()
    commit = (w * (h.detach() - h_bal) ** 2).mean()
    ref = ddpm + reg + 0.25 * commit

    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["ddpm"].double(), ddpm, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["reg"].double(), reg, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["commit"].double(), commit, rtol=1e-5, atol=1e-8)
    # The stop-gradients: the same gradients as the formula with its detaches.
    for a, b in zip(got, _grads(model, ref), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


def test_cbdm_per_sample_dropout_regularises_only_kept_labels(sched) -> None:
    obj = CBDMObjective(cond_drop_prob=0.5, cond_drop_mode="sample")
    obj.setup(COUNTS)
    model = TinyNet()
    x0, y = toy_batch(8)
    y = torch.arange(8) % 3
    torch.manual_seed(11)
    out, ctx = obj.compute(model, x0, y, sched)

    torch.manual_seed(11)
    t = torch.randint(0, T, (8,))
    eps = torch.randn_like(x0)
    keep = torch.rand(8) >= 0.5
    y_in = torch.where(keep, y, torch.full_like(y, model.null_label))
    probs = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    y_bal = draw_labels(probs, 8)
    abar = abar_of(t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    h, h_bal = model.formula(x_t, t, y_in), model.formula(x_t, t, y_bal)
    # Dropped samples contribute zero; the sum is still divided by the whole batch.
    w = (keep.double() * t.double() / T)[:, None, None, None]
    reg = (w * (h - h_bal) ** 2).mean()
    ref = ((h - eps) ** 2).mean() + 1.25 * reg

    assert 0 < int(keep.sum()) < 8  # the draw mixes kept and dropped samples
    assert torch.equal(ctx.y_in, y_in)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["reg"].double(), reg, rtol=1e-5, atol=1e-8)


def test_cbdm_regulariser_is_zero_on_a_droppedtoy_batch(sched) -> None:
    obj = CBDMObjective(cond_drop_prob=0.1, cond_drop_mode="batch")
    obj.setup(COUNTS)
    obj._host_rng = AlwaysDrop()
    model = TinyNet()
    x0, y = toy_batch()
    torch.manual_seed(5)
    out, ctx = obj.compute(model, x0, y, sched)
    assert ctx.dropped
    assert len(model.seen) == 1  # no second forward for y'
    assert torch.equal(model.seen[0], torch.full_like(y, model.null_label))
    assert out.terms["reg"] == 0 and out.terms["commit"] == 0

    torch.manual_seed(5)
    t = torch.randint(0, T, (6,))
    eps = torch.randn_like(x0)
    abar = abar_of(t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    ref = ((model.formula(x_t, t, torch.full_like(y, 3)) - eps) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("empirical", [0.6, 0.3, 0.1]),
        ("uniform", [1 / 3, 1 / 3, 1 / 3]),
        ("inverse", [1 / 60 / 0.15, 1 / 30 / 0.15, 1 / 10 / 0.15]),  # sum of 1/N = 0.15
    ],
)
def test_cbdm_target_labels_follow_the_target_distribution(kind: str, expected: list) -> None:
    obj = CBDMObjective(target_dist=kind)
    obj.setup([60, 30, 10])
    torch.manual_seed(0)
    n = 200_000
    freq = torch.bincount(obj.target_labels(n), minlength=3).double() / n
    p = torch.tensor(expected, dtype=torch.float64)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)


def test_cbdm_refuses_unknown_target_dist_and_class_mismatch(sched) -> None:
    with pytest.raises(ValueError, match="target_dist"):
        CBDMObjective(target_dist="balanced")
    obj = CBDMObjective(cond_drop_prob=0.0)
    obj.setup([4, 3, 2, 1])  # 4 classes; TinyNet has 3
    with pytest.raises(ValueError, match="num_classes"):
        obj(TinyNet(), *toy_batch(), sched)


def test_ddpm_and_cbdm_expose_the_context_a_wrapper_needs(sched) -> None:
    model = TinyNet()
    x0, y = toy_batch()
    for obj in (DDPMObjective(cond_drop_prob=0.0), CBDMObjective(cond_drop_prob=0.0)):
        obj.setup(COUNTS)
        torch.manual_seed(1)
        out, ctx = obj.compute(model, x0, y, sched)
        assert isinstance(ctx, Step)
        assert ctx.eps_pred.requires_grad and not ctx.dropped
        # The context reproduces the base prediction: a wrapper can re-run the model on it.
        torch.testing.assert_close(ctx.eps_pred, model.formula(ctx.x_t, ctx.t, ctx.y_in))
        abar = abar_of(ctx.t)
        torch.testing.assert_close(ctx.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * ctx.noise)
        assert ctx.target is ctx.noise


# ----------------------------------------------------------------------------------------------
# OC


def _oc_probs_formula(x_t, x0, t) -> torch.Tensor:
    abar = abar_of(t)[:, 0, 0, 0]
    sigma2 = 1.0 / abar - 1.0
    c = x_t / abar.sqrt()[:, None, None, None]
    b = x_t.shape[0]
    logits = torch.empty(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            logits[i, j] = -((c[i] - x0[j]) ** 2).sum() / (2 * sigma2[i])
    return torch.softmax(logits, dim=1)


def test_oc_selection_probabilities_equal_softmax_of_the_logits(sched) -> None:
    x0, _ = toy_batch(5, seed=2)
    t = torch.tensor([0, 40, 200, 600, 999])
    torch.manual_seed(0)
    eps = torch.randn_like(x0)
    abar = abar_of(t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    got = oc_selection_probs(x_t, x0, t, sched)
    torch.testing.assert_close(got, _oc_probs_formula(x_t, x0, t), rtol=1e-9, atol=1e-12)
    assert got[0, 0] > 0.999  # at t = 0 the own image is (almost) certain
    assert got[4].max() < 0.9  # at t = T - 1 the draw is spread over the batch
    # float32 (the training dtype) agrees too.
    got32 = oc_selection_probs(x_t.float(), x0.float(), t, NoiseSchedule(T))
    torch.testing.assert_close(got32.double(), got, rtol=1e-3, atol=1e-5)


def test_oc_gates_accept_and_reject_as_specified() -> None:
    q_anchor = torch.tensor([0.5, 0.5, 0.1, 0.1])
    q_ref = torch.tensor([0.5, 0.1, 0.5, 0.1])
    assert oc_gate(q_anchor, q_ref, "t2h").tolist() == [True, False, True, True]
    assert oc_gate(q_anchor, q_ref, "h2t").tolist() == [True, True, False, True]
    assert oc_gate(q_anchor, q_ref, "full").tolist() == [True] * 4
    with pytest.raises(ValueError, match="gate"):
        OCObjective(gate="both")


@pytest.mark.parametrize(
    "gate,head_may_move,tail_may_move",
    [("t2h", False, True), ("h2t", True, False), ("full", True, True)],
)
def test_oc_select_gates_the_drawn_reference(
    sched, gate: str, head_may_move: bool, tail_may_move: bool
) -> None:
    # Samples 0 (head class) and 1 (tail class) share their image, the others are far away: at
    # low noise each anchor draws 0 or 1 with probability 1/2 each.
    x0 = torch.zeros(4, 1, 4, 4, dtype=torch.float64)
    x0[2], x0[3] = 1.0, -1.0
    y = torch.tensor([0, 2, 1, 1])
    obj = OCObjective(gate=gate)
    obj.setup([50, 10, 5])
    t = torch.full((4,), 5)
    torch.manual_seed(0)
    picks = []
    for _ in range(200):
        eps = 0.1 * torch.randn_like(x0)
        abar = abar_of(t)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        picks.append(obj.select(x_t, x0, y, t, sched))
    picks = torch.stack(picks)
    assert set(picks[:, 0].tolist()) == ({0, 1} if head_may_move else {0})
    assert set(picks[:, 1].tolist()) == ({0, 1} if tail_may_move else {1})
    assert (picks[:, 2] == 2).all() and (picks[:, 3] == 3).all()


def test_oc_loss_equals_formula_and_no_gradient_flows_through_the_selection(sched) -> None:
    obj = OCObjective(gate="t2h", cond_drop_prob=0.0)
    obj.setup(COUNTS)
    model = TinyNet()
    x0, y = toy_batch(8, seed=4)
    x0.requires_grad_(True)
    torch.manual_seed(9)
    out, ctx = obj.compute(model, x0, y, sched)
    assert not ctx.target.requires_grad  # the transferred target is a constant
    got = torch.autograd.grad(out.loss, [model.w, model.b, x0])

    torch.manual_seed(9)
    t = torch.randint(0, T, (8,))
    eps = torch.randn_like(x0)
    abar = abar_of(t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        # A draw from softmax(l_i) by inverse CDF (one uniform per row), from the formula.
        cdf = _oc_probs_formula(x_t, x0, t).cumsum(1)
        u = torch.rand(8, 1, dtype=cdf.dtype) * cdf[:, -1:]
        j = (cdf <= u).sum(1).clamp_max(7)
        q = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
        j = torch.where(q[y[j]] >= q[y], j, torch.arange(8))
        eps_hat = (x_t - abar.sqrt() * x0[j]) / (1 - abar).sqrt()
    ref = ((model.formula(x_t, t, y) - eps_hat) ** 2).mean()
    assert (j != torch.arange(8)).any()  # some targets were transferred
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ctx.target, eps_hat, rtol=1e-9, atol=1e-9)
    moved = (j != torch.arange(8)).double().mean()
    torch.testing.assert_close(out.terms["transfer"].double(), moved)
    # Gradients (x0 included) are those of the formula with a constant target: x0 reaches the
    # loss only through the model input x_t, never through the selection or the target.
    for a, b in zip(got, torch.autograd.grad(ref, [model.w, model.b, x0]), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


def test_oc_transfer_applies_on_dropped_batches_too(sched) -> None:
    obj = OCObjective(gate="full")
    obj.setup(COUNTS)
    obj._host_rng = AlwaysDrop()
    x0, y = toy_batch(8, seed=4)
    torch.manual_seed(9)
    out, ctx = obj.compute(TinyNet(), x0, y, sched)
    assert ctx.dropped and out.terms["transfer"] > 0


def test_oc_under_bf16_autocast_computes_in_float32() -> None:
    sched = NoiseSchedule(T)
    obj = OCObjective(cond_drop_prob=0.0)
    obj.setup(COUNTS)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t, y: net(x)  # noqa: E731
    model.null_label = 3
    x0, y = toy_batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ctx = obj.compute(model, x0.float(), y, sched)
    assert ctx.eps_pred.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and math.isfinite(float(out.loss.detach()))


# ----------------------------------------------------------------------------------------------
# Short training runs


@pytest.mark.parametrize(
    "make",
    [
        lambda: CBDMObjective(),
        lambda: CBDMObjective(cond_drop_mode="sample", target_dist="inverse"),
        lambda: OCObjective(),
    ],
    ids=["cbdm", "cbdm-sample-inverse", "oc"],
)
def test_short_training_run_lowers_the_loss(make) -> None:
    losses = train_losses(make(), steps=60)["loss"]
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.5 * first, (first, last)


def test_oc_ties_reject_keeps_only_same_class_references_at_equal_frequencies(sched) -> None:
    """The published t2h gate (q_ref >= q_anchor) accepts every reference when all classes are
    equally frequent; ties=reject accepts only the anchor's own class there, and still accepts
    strictly more frequent classes; cut_time keeps the anchors with t <= cut_time on their own
    target."""
    q = torch.tensor([0.25, 0.25, 0.5])
    anchor, ref = torch.tensor([0, 0, 0, 2]), torch.tensor([0, 1, 2, 0])
    same = anchor == ref
    assert oc_gate(q[anchor], q[ref], "t2h").tolist() == [True, True, True, False]
    assert oc_gate(q[anchor], q[ref], "t2h", same).tolist() == [True, False, True, False]
    assert oc_gate(q[anchor], q[ref], "h2t", same).tolist() == [True, False, False, True]

    torch.manual_seed(0)
    n = 64
    x0 = torch.randn(n, 3) * 0.01  # every point alike: the posterior spreads over the batch
    y = torch.arange(n) % 4
    t = torch.randint(0, T, (n,))
    x_t = x0 + torch.randn_like(x0)
    for ties, cut in (("accept", -1), ("reject", -1), ("accept", T // 2)):
        oc = OCObjective(ties=ties, cut_time=cut)
        oc.setup([10, 10, 10, 10])  # balanced: every frequency ties
        j = oc.select(x_t, x0, y, t, sched)
        moved = j != torch.arange(n)
        cross = y[j] != y
        if ties == "reject":
            assert not cross.any()
        else:
            assert cross.any()
        assert not moved[t <= cut].any()
