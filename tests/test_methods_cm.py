"""CM (capacity manipulation) against an independent float64 recomputation of eqs. 2-4, its
class weights (eq. 3), ablations, null-label handling, the method configs, and short training
runs of CM and Group-Expert LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lt_diffusion.data import longtail_counts
from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods import CBDMObjective, DDPMObjective, OCObjective
from lt_diffusion.methods.cm import CMObjective, cm_class_weights
from lt_diffusion.methods.group_expert import GroupExpertObjective, group_expert_lora
from lt_diffusion.models import UNet
from lt_diffusion.models.lowrank import LowRankMixin, lowrank_layers, reserve_capacity
from tests.conftest import compose_config

COUNTS = [5, 3, 1]
SCHEDULE = NoiseSchedule()
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# A tiny float64 model with one decomposed layer, and the loss written out by hand


class TinyNet(nn.Module):
    """``eps = x_t.flatten() W^T + c + E[y] + 1e-3 t`` on (B, 1, 4, 4) images, float64; row 3
    of ``E`` is the null label. It counts its forward calls."""

    num_classes = 3
    null_label = 3

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(16, 16, dtype=torch.float64)
        self.emb = nn.Parameter(torch.randn(4, 16, generator=g, dtype=torch.float64))
        self.calls = 0

    def forward(self, x, t, y, aug_labels=None):
        self.calls += 1
        out = self.lin(x.flatten(1)) + self.emb[y] + 1e-3 * t[:, None]
        return out.view_as(x)


def decomposed_tiny() -> TinyNet:
    """TinyNet with ``lin`` decomposed (rank 4) and non-zero ``B``."""
    net = reserve_capacity(TinyNet(), rank_ratio=0.25, layers=["lin"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        net.lin.lowrank_B.copy_(0.3 * torch.randn(net.lin.lowrank_B.shape, generator=g))
    assert net.lin.rank == 4
    return net


def weights64(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 in float64, written out."""
    n = torch.tensor(counts, dtype=torch.float64)
    c = len(counts)
    return c * n / n.sum(), c / (n * (1 / n).sum())


def hand_loss(net: TinyNet, ctx, base_loss, lam, use_con, use_div, counts):
    """``L_base + lam * L_CM`` from the parameters, in float64, with autograd through both
    branches (the paper has no stop-gradient). ``base_loss`` is a callable of the prediction."""
    lin = net.lin
    w_g, a, b = lin.weight, lin.lowrank_A, lin.lowrank_B
    h = ctx.x_t.flatten(1).double()
    rest = lin.bias + net.emb[ctx.y_in] + 1e-3 * ctx.t[:, None].double()
    eps = (h @ (w_g + b @ a).T + rest).view_as(ctx.x_t)
    eps_g = (h @ w_g.T + rest).view_as(ctx.x_t)
    d = (eps - eps_g).pow(2).flatten(1).mean(1)
    w_con, w_div = weights64(counts)
    real = ctx.y_in != net.null_label
    y = torch.where(real, ctx.y_in, 0)
    weight = torch.zeros(len(y), dtype=torch.float64)
    if use_con:
        weight = weight + w_con[y]
    if use_div:
        weight = weight - w_div[y]
    cm = (weight * real.double() * d).mean()
    return base_loss(eps) + lam * cm, cm


def grads(net: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    net.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def x0_y(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(batch) % 3


# ----------------------------------------------------------------------------------------------
# Class weights (eq. 3)


def test_class_weights_are_one_when_balanced() -> None:
    w_con, w_div = cm_class_weights([7, 7, 7, 7])
    ones = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(w_con, ones, rtol=1e-15, atol=0)
    torch.testing.assert_close(w_div, ones, rtol=1e-15, atol=0)


def test_class_weights_match_eq3() -> None:
    counts = longtail_counts("exp", 5000, 10, 100)
    w_con, w_div = cm_class_weights(counts)
    ref_con, ref_div = weights64(counts)
    torch.testing.assert_close(w_con, ref_con, rtol=1e-14, atol=0)
    torch.testing.assert_close(w_div, ref_div, rtol=1e-14, atol=0)
    assert w_con[0] > 1 > w_con[-1] and w_div[0] < 1 < w_div[-1]
    with pytest.raises(ValueError, match="classes \\[1\\] have none"):
        cm_class_weights([3, 0, 1])


# ----------------------------------------------------------------------------------------------
# The loss against the float64 recomputation


@pytest.mark.parametrize(
    "use_con,use_div,lam", [(True, True, 1.0), (False, True, 1.0), (True, False, 0.5)]
)
def test_cm_loss_and_gradients_match_float64(use_con: bool, use_div: bool, lam: float) -> None:
    net = decomposed_tiny()
    obj = CMObjective(DDPMObjective(cond_drop_prob=0.0), lam=lam, use_con=use_con, use_div=use_div)
    obj.setup(COUNTS)
    x0, y = x0_y()
    out, ctx = obj.compute(net, x0, y, SCHEDULE)
    ref, cm = hand_loss(
        net, ctx, lambda eps: (eps - ctx.noise).pow(2).mean(), lam, use_con, use_div, COUNTS
    )
    # L_CM is computed in the prediction's dtype (float64 here): exact. The DDPM base loss is
    # computed in float32 by design, so the total agrees to float32 precision.
    torch.testing.assert_close(out.terms["cm"], cm.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-7)
    # The logged parts: L_Con >= 0, L_Div <= 0 (eq. 2 signs), zero when ablated.
    con, div = out.terms["con"], out.terms["div"]
    assert (con > 0) == use_con and (div < 0) == use_div
    torch.testing.assert_close(con + div, out.terms["cm"])
    # No stop-gradient: the gradients of W_g, A, B, E equal those of the written-out formula.
    g_obj = grads(net, out.loss)
    g_ref = grads(net, ref)
    assert g_obj.keys() == g_ref.keys()
    for name in g_obj:
        torch.testing.assert_close(g_obj[name], g_ref[name], rtol=1e-5, atol=1e-7)
    assert g_obj["lin.lowrank_A"].abs().sum() > 0


def test_ablations_are_the_documented_formulas() -> None:
    """w/o L_Con: L_base - lam mean(w_div d); w/o L_Div: L_base + lam mean(w_con d); the full
    loss is their sum minus L_base (same draws)."""
    net = decomposed_tiny()
    x0, y = x0_y()
    losses, bases = {}, {}
    for key, (con, div) in {"full": (1, 1), "no_con": (0, 1), "no_div": (1, 0)}.items():
        obj = CMObjective(DDPMObjective(cond_drop_prob=0.0), use_con=bool(con), use_div=bool(div))
        obj.setup(COUNTS)
        torch.manual_seed(7)
        out, _ = obj.compute(net, x0, y, SCHEDULE)
        losses[key], bases[key] = out.loss.detach(), out.terms["base"]
    assert torch.equal(bases["full"], bases["no_con"]) and torch.equal(
        bases["full"], bases["no_div"]
    )
    torch.testing.assert_close(
        losses["full"] - bases["full"],
        (losses["no_con"] - bases["full"]) + (losses["no_div"] - bases["full"]),
        rtol=1e-10,
        atol=1e-12,
    )
    assert losses["no_con"] < bases["full"] < losses["no_div"]


def test_balanced_data_gives_zero_cm_loss() -> None:
    net = decomposed_tiny()
    obj = CMObjective(DDPMObjective(cond_drop_prob=0.0))
    obj.setup([4, 4, 4])
    out, _ = obj.compute(net, *x0_y(), SCHEDULE)
    assert abs(out.terms["cm"].item()) < 1e-6 and out.terms["con"] > 0


def test_null_label_handling() -> None:
    x0, y = x0_y()
    # Batch-mode dropout: a dropped batch gets no CM term and no extra forward.
    net = decomposed_tiny()
    obj = CMObjective(DDPMObjective(cond_drop_prob=0.5, cond_drop_mode="batch"))
    obj.setup(COUNTS, seed=0)
    seen = set()
    for _ in range(12):
        net.calls = 0
        out, ctx = obj.compute(net, x0, y, SCHEDULE)
        seen.add(ctx.dropped)
        if ctx.dropped:
            assert (
                net.calls == 1 and out.terms["cm"] == 0 and torch.equal(out.loss, out.terms["base"])
            )
        else:
            assert net.calls == 2 and out.terms["cm"] != 0
    assert seen == {True, False}
    # Per-sample dropout: null samples weigh 0, the sum is still divided by the batch size.
    obj = CMObjective(DDPMObjective(cond_drop_prob=0.5, cond_drop_mode="sample"))
    obj.setup(COUNTS)
    torch.manual_seed(3)
    out, ctx = obj.compute(net, x0, y, SCHEDULE)
    n_null = int((ctx.y_in == net.null_label).sum())
    assert 0 < n_null < len(y)
    _, cm = hand_loss(net, ctx, lambda eps: 0.0, 1.0, True, True, COUNTS)
    torch.testing.assert_close(out.terms["cm"], cm.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, out.terms["base"] + cm.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("base_cls", [OCObjective, CBDMObjective])
def test_cm_on_oc_and_cbdm_bases(base_cls) -> None:
    """``L = L_base + lam L_CM``: the base part is the base objective's own loss on the same
    draws; the CM part is recomputed from the context in float64."""
    net = decomposed_tiny()
    x0, y = x0_y()
    base = base_cls(cond_drop_prob=0.0)
    base.setup(COUNTS)
    cm = CMObjective(base_cls(cond_drop_prob=0.0), lam=0.8)
    cm.setup(COUNTS)
    torch.manual_seed(11)
    base_out, _ = base.compute(net, x0, y, SCHEDULE)
    torch.manual_seed(11)
    out, ctx = cm.compute(net, x0, y, SCHEDULE)
    torch.testing.assert_close(out.terms["base"], base_out.loss.detach(), rtol=0, atol=0)
    _, cm_ref = hand_loss(net, ctx, lambda eps: 0.0, 0.8, True, True, COUNTS)
    torch.testing.assert_close(out.terms["cm"], cm_ref.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, base_out.loss + 0.8 * cm_ref, rtol=1e-12, atol=0)
    for key in base_out.terms:  # the base's own terms are logged too
        assert key in out.terms


def test_cm_refuses_misuse() -> None:
    x0, y = x0_y()
    obj = CMObjective(DDPMObjective(cond_drop_prob=0.0))
    with pytest.raises(RuntimeError, match="setup"):
        obj.compute(decomposed_tiny(), x0, y, SCHEDULE)
    obj.setup(COUNTS)
    with pytest.raises(ValueError, match="no low-rank layers"):
        obj.compute(TinyNet(), x0, y, SCHEDULE)
    with pytest.raises(TypeError, match="composable"):
        CMObjective(nn.Identity())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The method configs build and run one step


@pytest.mark.parametrize(
    "method",
    [
        "cm",
        "cm_ddpm",
        "cm_cbdm",
        "cm_without_con",
        "cm_without_div",
        "cbdm_decomposed",
        "cbdm_lora",
        "group_expert_lora",
    ],
)
def test_method_configs_build_and_step(method: str) -> None:
    from lt_diffusion.runs.build import build_model, build_objective

    cfg = compose_config("train", [f"method={method}", "model=unet_tiny", "dataset=cifar10_lt"])
    assert cfg.method.name == method
    model = build_model(cfg)
    objective = build_objective(cfg)
    counts = longtail_counts("exp", 50, 10, 10)
    objective.setup(counts)
    layers = {n for n, m in model.named_modules() if isinstance(m, LowRankMixin)}
    assert layers and all(n.startswith("up.") for n in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "cbdm_lora":
        assert all("lowrank_" in n for n in trainable) and cfg.method.requires_init_from
    else:
        assert len(trainable) == len(list(model.parameters()))
    torch.manual_seed(0)
    out = objective(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 6, 9]), SCHEDULE)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    if method.startswith("cm"):
        assert {"base", "cm", "con", "div"} <= out.terms.keys()


# ----------------------------------------------------------------------------------------------
# Short training runs: CM (DDPM and OC bases) and Group-Expert LoRA lower the loss


def small_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(
        image_size=8,
        in_channels=1,
        ch=32,
        ch_mult=(1, 2),
        attn_resolutions=(),
        num_res_blocks=1,
        dropout=0.0,
        num_classes=3,
    )


def fixed_data() -> tuple[torch.Tensor, torch.Tensor]:
    """12 images, 6 / 4 / 2 per class: one smooth pattern per class plus a little noise."""
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 8)
    patterns = torch.stack(
        [grid[None, :].expand(8, 8), grid[:, None].expand(8, 8), grid[:, None] * grid[None, :]]
    )
    y = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    x0 = 0.8 * patterns[y][:, None] + 0.05 * torch.randn(12, 1, 8, 8, generator=g)
    return x0, y


def eval_loss(objective, model, x0, y) -> float:
    """The objective's loss averaged over fixed draws (same noise and timesteps every call)."""
    state = torch.get_rng_state()
    total = 0.0
    with torch.no_grad():
        for seed in range(4):
            torch.manual_seed(100 + seed)
            total += objective(model, x0, y, SCHEDULE).loss.item()
    torch.set_rng_state(state)
    return total / 4


def train(model, objective, steps: int = 80) -> None:
    x0, y = fixed_data()
    counts = [6, 4, 2]
    objective.setup(counts)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = objective(model, x0, y, SCHEDULE).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("base_cls", [DDPMObjective, OCObjective])
def test_short_cm_training_lowers_the_loss(base_cls) -> None:
    model = reserve_capacity(small_unet())
    probe = CMObjective(base_cls(cond_drop_prob=0.0))  # evaluation: no dropout
    probe.setup([6, 4, 2])
    x0, y = fixed_data()
    before = eval_loss(probe, model, x0, y)
    train(model, CMObjective(base_cls(cond_drop_prob=0.1)))
    after = eval_loss(probe, model, x0, y)
    assert after < 0.6 * before, (before, after)
    # B A has been learned: theta and theta_g now differ, so L_CM is active.
    assert any(m.lowrank_B.abs().max() > 0 for m in lowrank_layers(model))
    torch.manual_seed(1)
    assert probe(model, x0, y, SCHEDULE).terms["cm"] != 0


def test_short_group_expert_training_lowers_the_loss() -> None:
    model = group_expert_lora(small_unet())
    probe = GroupExpertObjective(DDPMObjective(cond_drop_prob=0.0))
    probe.setup([6, 4, 2])
    x0, y = fixed_data()
    before = eval_loss(probe, model, x0, y)
    untouched = copy.deepcopy(model)
    train(model, GroupExpertObjective(DDPMObjective(cond_drop_prob=0.1)))
    after = eval_loss(probe, model, x0, y)
    assert after < 0.6 * before, (before, after)
    # Every expert saw its own group's samples and learned.
    for m, m0 in zip(lowrank_layers(model), lowrank_layers(untouched)):
        lo = 0
        for r in m.expert_ranks:
            assert not torch.equal(m.lowrank_B[:, lo : lo + r], m0.lowrank_B[:, lo : lo + r])
            lo += r


# ----------------------------------------------------------------------------------------------
# Through the training command: CBDM, then CBDM (LoRA) from its checkpoint


def test_cbdm_lora_fine_tunes_only_the_factors_of_a_cbdm_checkpoint(train_overrides, tmp_path):
    """train.init_from loads the CBDM EMA backbone before the transform; with freeze_base only
    B A move, and the saved model reloads (transform re-applied) for sampling."""
    from lt_diffusion import train
    from lt_diffusion.models.lowrank import merge_lowrank
    from lt_diffusion.runs.checkpoint import model_state, read_checkpoint
    from lt_diffusion.runs.load import load_sampling_model

    def run(name: str, *extra: str):
        cfg = compose_config(
            "train", [*train_overrides(*extra), f"paths.run_dir={tmp_path / name}"]
        )
        return train.run(cfg) / "checkpoints" / "last.ckpt"

    cbdm = run("cbdm", "method=cbdm", "train.max_steps=2")
    lora = run("lora", "method=cbdm_lora", "train.max_steps=3", f"train.init_from={cbdm}")
    start = model_state(read_checkpoint(cbdm), ema=True)
    tuned = model_state(read_checkpoint(lora), ema=False)
    lowrank = {k for k in tuned if "lowrank_" in k}
    assert lowrank and set(tuned) - lowrank == set(start)
    for key, value in start.items():  # the frozen base is the CBDM model, bit for bit
        assert torch.equal(tuned[key], value), key
    assert any(tuned[k].abs().sum() > 0 for k in lowrank if k.endswith("lowrank_B"))

    model, meta = load_sampling_model(lora)
    assert meta["config"]["method"]["name"] == "cbdm_lora" and lowrank_layers(model)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), torch.tensor([0, 9])
    with torch.no_grad():
        out = model(x, t, y)
        assert (merge_lowrank(model)(x, t, y) - out).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["cm", "group_expert_lora"])
def test_training_command_runs_and_reloads(method: str, train_overrides, tmp_path) -> None:
    from lt_diffusion import train
    from lt_diffusion.runs.load import load_sampling_model

    overrides = [*train_overrides(f"method={method}", "train.max_steps=2")]
    cfg = compose_config("train", [*overrides, f"paths.run_dir={tmp_path / 'run'}"])
    last = train.run(cfg) / "checkpoints" / "last.ckpt"
    model, _ = load_sampling_model(last)  # rebuilt from its config: transform re-applied
    assert lowrank_layers(model)
    if method == "group_expert_lora":
        assert model.expert_router.splits == ["many"] * 3 + ["medium"] * 3 + ["few"] * 4
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), torch.tensor([0, 9]))
    assert torch.isfinite(out).all()
