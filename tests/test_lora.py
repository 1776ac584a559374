"""Capacity reservation (W = W_g + B A), its theta_g-only switch, merging, freezing, checkpoint
round trips, and the label-routed Group-Expert LoRA layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lt_diffusion.methods import DDPMObjective
from lt_diffusion.methods.group_expert import (
    GroupExpertObjective,
    expert_ranks,
    group_expert_lora,
)
from lt_diffusion.models import UNet
from lt_diffusion.models.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    LowRankMixin,
    expert_switch,
    lowrank_parameter_count,
    lowrank_rank,
    merge_lowrank,
    reserve_capacity,
    set_expert_enabled,
    theta_g_only,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0, attn: tuple[int, ...] = (4,)) -> UNet:
    """unet_tiny's widths (ch 32, ch_mult [1, 2], one res block) at 8 px, attention at 4 px so
    the up path also has attention projections; 3 classes."""
    torch.manual_seed(seed)
    model = UNet(
        image_size=8,
        in_channels=1,
        ch=32,
        ch_mult=(1, 2),
        attn_resolutions=attn,
        num_res_blocks=1,
        dropout=0.0,
        num_classes=3,
    )
    # Ho et al.'s near-zero output layers would hide every difference: unit-gain weights.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return model


def inputs(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.arange(batch) % 3
    return x, t, y


def randomize_lowrank(model: nn.Module, std: float = 0.05, seed: int = 5) -> None:
    """Non-zero B (and a fresh A) everywhere, so B A changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankMixin):
                m.lowrank_A.copy_(torch.randn(m.lowrank_A.shape, generator=g) * std)
                m.lowrank_B.copy_(torch.randn(m.lowrank_B.shape, generator=g) * std)


def plain_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def expected_rank(layer: nn.Module, ratio: float) -> int:
    """The spec's rank, written out: d = out, k = in * kh * kw (conv) or in (linear)."""
    if isinstance(layer, nn.Conv2d):
        d = layer.out_channels
        k = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    else:
        d, k = layer.out_features, layer.in_features
    return max(1, math.floor(ratio * min(d, k) + 0.5))


# ----------------------------------------------------------------------------------------------
# Capacity reservation


def test_rank_rule() -> None:
    assert lowrank_rank(128, 1152, 0.1) == 13
    assert lowrank_rank(256, 4608, 0.1) == 26
    assert lowrank_rank(3, 1152, 0.1) == 1  # at least 1
    assert lowrank_rank(25, 100, 0.1) == 3  # 2.5 rounds half up
    assert lowrank_rank(64, 64, 1.0) == 64


@pytest.mark.parametrize(
    "layers,selected",
    [
        ("up", lambda n: n.startswith("up.")),
        ("all", lambda n: True),
        (["mid.0", "tail"], lambda n: n.startswith("mid.0.") or n.startswith("tail.")),
    ],
)
def test_reserve_capacity_touches_only_the_chosen_layers(layers, selected) -> None:
    ref = tiny_unet()
    before = plain_layers(ref)
    model = reserve_capacity(copy.deepcopy(ref), rank_ratio=0.1, layers=layers)
    after = dict(model.named_modules())
    n_lowrank = 0
    for name, old in before.items():
        new = after[name]
        if selected(name):
            kind = LowRankConv2d if isinstance(old, nn.Conv2d) else LowRankLinear
            assert type(new) is kind, name
            r = expected_rank(old, 0.1)
            d, k = old.weight.shape[0], old.weight[0].numel()
            assert new.lowrank_A.shape == (r, k) and new.lowrank_B.shape == (d, r), name
            assert torch.count_nonzero(new.lowrank_B) == 0
            assert torch.equal(new.weight, old.weight)  # W_g = the layer's own weight
            n_lowrank += 1
        else:
            assert type(new) is type(old), name
    assert n_lowrank > 0
    if layers == "up":  # the up path holds attention projections and the upsampler conv
        assert {"up.0.attn.q", "up.2.conv"} <= {n for n in before if selected(n)}
    # B = 0: the transformed model computes exactly what the plain one did.
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), ref(x, t, y))


def test_reserve_capacity_refuses_bad_specs() -> None:
    with pytest.raises(ValueError, match="rank_ratio"):
        reserve_capacity(tiny_unet(), rank_ratio=0.0)
    with pytest.raises(ValueError, match="no module named"):
        reserve_capacity(tiny_unet(), layers=["decoder"])
    with pytest.raises(ValueError, match="init"):
        reserve_capacity(tiny_unet(), init="svd")
    model = reserve_capacity(tiny_unet())
    with pytest.raises(ValueError, match="already has low-rank layers"):
        reserve_capacity(model)


def test_merged_model_matches_unmerged() -> None:
    model = reserve_capacity(tiny_unet()).eval()
    randomize_lowrank(model)
    n_plain = sum(p.numel() for p in tiny_unet().parameters())
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        with theta_g_only(model):
            out_g = model(x, t, y)
        merged = merge_lowrank(copy.deepcopy(model))
        assert not any(isinstance(m, LowRankMixin) for m in merged.modules())
        assert sum(p.numel() for p in merged.parameters()) == n_plain  # no inference overhead
        assert (merged(x, t, y) - out).abs().max() < 1e-5
        assert (out - out_g).abs().max() > 1e-3  # B A does matter here
        # A layer switched off merges to W_g alone: a merged theta_g-only model.
        set_expert_enabled(model, False)
        merged_g = merge_lowrank(copy.deepcopy(model))
        assert (merged_g(x, t, y) - out_g).abs().max() < 1e-5


def test_theta_g_switch_equals_the_model_without_BA() -> None:
    model = reserve_capacity(tiny_unet()).eval()
    randomize_lowrank(model)
    with torch.no_grad():  # also move W_g away from the shared init
        for m in model.modules():
            if isinstance(m, LowRankMixin):
                m.weight.add_(0.01)
    # The same weights in a plain backbone, B A dropped (strict load: exactly the W_g keys).
    plain = tiny_unet(seed=9).eval()
    state = {k: v for k, v in model.state_dict().items() if "lowrank_" not in k}
    plain.load_state_dict(state)
    x, t, y = inputs()
    with torch.no_grad():
        full = model(x, t, y)
        with expert_switch(model, False) as n:
            assert n == len([m for m in model.modules() if isinstance(m, LowRankMixin)])
            torch.testing.assert_close(model(x, t, y), plain(x, t, y), rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, y), full, rtol=0, atol=0)  # state restored
        assert set_expert_enabled(model, False) == n
        torch.testing.assert_close(model(x, t, y), plain(x, t, y), rtol=0, atol=0)
        set_expert_enabled(model, True)
    with pytest.raises(RuntimeError), expert_switch(model, False):  # restored on errors too
        raise RuntimeError
    assert all(m.expert_enabled for m in model.modules() if isinstance(m, LowRankMixin))


def test_checkpoint_round_trip() -> None:
    model = reserve_capacity(tiny_unet()).eval()
    randomize_lowrank(model)
    fresh = reserve_capacity(tiny_unet(seed=3)).eval()  # built and transformed from scratch
    fresh.load_state_dict(model.state_dict())  # strict
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), model(x, t, y))


def test_freeze_base_leaves_only_the_lowrank_factors_trainable() -> None:
    model = reserve_capacity(tiny_unet(), freeze_base=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lowrank_A", "lowrank_B")) for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == lowrank_parameter_count(model)
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_bf16_autocast_and_compile() -> None:
    """The decomposed model trains under bf16 autocast, and torch.compile traces both switch
    states without graph breaks (fullgraph)."""
    model = reserve_capacity(tiny_unet(attn=()))
    randomize_lowrank(model)
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert model.up[0].conv1.lowrank_A.grad is not None

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        ref_full = model(x, t, y)
        with theta_g_only(model):
            ref_g = model(x, t, y)
        torch.testing.assert_close(compiled(x, t, y), ref_full)
        with theta_g_only(compiled):  # the switch reaches through the compile wrapper
            torch.testing.assert_close(compiled(x, t, y), ref_g)
        torch.testing.assert_close(compiled(x, t, y), ref_full)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Group-Expert LoRA


class TwoLayerNet(nn.Module):
    """A float64 'backbone' with one Linear and one 3x3 conv: enough to write the expert
    formula by hand. ``forward(x, t, y)`` like the U-Net (the labels only route here)."""

    num_classes = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8, dtype=torch.float64)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, dtype=torch.float64)

    def forward(self, x, t, y=None):
        h = self.lin(x.flatten(1)).view(-1, 2, 2, 2)
        return self.conv(h)


def test_expert_rank_split() -> None:
    assert expert_ranks(13) == [5, 4, 4]
    assert expert_ranks(26) == [9, 9, 8]
    assert expert_ranks(3) == [1, 1, 1]
    assert expert_ranks(2) == [1, 1, 1]  # every expert needs a rank: budget exceeded by 1


def test_group_experts_use_cm_rank_budget() -> None:
    cm = reserve_capacity(tiny_unet())
    ge = group_expert_lora(tiny_unet())
    cm_layers = {n: m for n, m in cm.named_modules() if isinstance(m, LowRankMixin)}
    ge_layers = {n: m for n, m in ge.named_modules() if isinstance(m, LowRankMixin)}
    assert cm_layers.keys() == ge_layers.keys()
    for name, layer in ge_layers.items():
        assert layer.rank == max(3, cm_layers[name].rank)
        assert sum(layer.expert_ranks) == layer.rank
    if all(m.rank >= 3 for m in cm_layers.values()):
        assert lowrank_parameter_count(ge) == lowrank_parameter_count(cm)
    assert ge.expert_router.splits == ["many", "medium", "few"]  # thirds of 3 classes


def test_group_expert_layers_match_the_formula_in_float64() -> None:
    """out_i = W_g x_i + b + B_g(i) A_g(i) x_i with g(i) the group of y_i; the null label
    (index C) uses no expert by default."""
    counts = [60, 50, 40, 30, 20, 10]  # thirds: classes 0-1 many, 2-3 medium, 4-5 few
    net = group_expert_lora(TwoLayerNet(), rank_ratio=0.75, layers="all", class_counts=counts)
    randomize_lowrank(net, std=0.3)
    x = torch.randn(7, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # 6 = null
    out = net(x, torch.zeros(7), y)

    group = [0, 0, 1, 1, 2, 2, None]

    def expert_delta(layer, g):
        if g is None:
            return torch.zeros_like(layer.weight)
        lo = sum(layer.expert_ranks[:g])
        hi = lo + layer.expert_ranks[g]
        delta = layer.lowrank_B[:, lo:hi] @ layer.lowrank_A[lo:hi]
        return delta.view(layer.weight.shape)

    for i in range(7):
        w_lin = net.lin.weight + expert_delta(net.lin, group[i])
        h = (x[i] @ w_lin.T + net.lin.bias).view(1, 2, 2, 2)
        w_conv = net.conv.weight + expert_delta(net.conv, group[i])
        ref = torch.nn.functional.conv2d(h, w_conv, net.conv.bias, padding=1)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("null_route", ["none", "many", "all"])
def test_group_routing_isolates_the_experts(null_route: str) -> None:
    model = group_expert_lora(tiny_unet(), null_route=null_route)
    randomize_lowrank(model)
    layers = [m for m in model.modules() if isinstance(m, LowRankMixin)]
    x, t, _ = inputs(batch=3)
    y_many = torch.zeros(3, dtype=torch.long)  # class 0 is Many (thirds of 3 classes)
    model(x, t, y_many).square().mean().backward()
    for layer in layers:
        lo = layer.expert_ranks[0]
        assert layer.lowrank_A.grad[:lo].abs().sum() > 0  # the Many expert learns ...
        assert layer.lowrank_B.grad[:, :lo].abs().sum() > 0
        assert torch.count_nonzero(layer.lowrank_A.grad[lo:]) == 0  # ... the others do not
        assert torch.count_nonzero(layer.lowrank_B.grad[:, lo:]) == 0

    with torch.no_grad():
        base = model(x, t, y_many)
        for layer in layers:  # changing the Medium / Few experts leaves Many samples alone
            layer.lowrank_B[:, layer.expert_ranks[0] :].normal_()
        assert torch.equal(model(x, t, y_many), base)
        with theta_g_only(model):
            out_g = model(x, t, y_many)
        assert (out_g - base).abs().max() > 1e-4
        # The null label (and y=None) follows null_route.
        null = torch.full((3,), model.null_label)
        out_null = model(x, t, null)
        assert torch.equal(model(x, t, None), out_null)
        with theta_g_only(model):
            null_g = model(x, t, null)
        if null_route == "none":
            assert torch.equal(out_null, null_g)
        else:
            assert not torch.equal(out_null, null_g)


def test_group_expert_checkpoint_round_trip_and_compile() -> None:
    model = group_expert_lora(tiny_unet(attn=()))
    randomize_lowrank(model)
    state = model.state_dict()
    assert "expert_router.group_of_label" in state
    fresh = group_expert_lora(tiny_unet(seed=4, attn=()))
    fresh.load_state_dict(state)
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        assert torch.equal(fresh(x, t, y), ref)
        ema = copy.deepcopy(model)  # the EMA copy routes through its own layers
        assert torch.equal(ema(x, t, y), ref)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # the hook is traced
        torch.testing.assert_close(compiled(x, t, y), ref)
        torch.testing.assert_close(compiled(x, t, y=y.flip(0)), model(x, t, y.flip(0)))
        torch._dynamo.reset()
    # Group experts are routed per sample: merging leaves them in place.
    assert any(isinstance(m, LowRankMixin) for m in merge_lowrank(model).modules())


def test_group_expert_objective_checks_the_routing() -> None:
    from lt_diffusion.diffusion import NoiseSchedule

    schedule = NoiseSchedule()
    x, _, y = inputs(batch=3)
    obj = GroupExpertObjective(DDPMObjective(cond_drop_prob=0.0))
    obj.setup([1, 3, 5])  # class 2 the head: not the project's ordering
    with pytest.raises(ValueError, match="routing does not match"):
        obj(group_expert_lora(tiny_unet()), x, y, schedule)
    obj.setup([5, 3, 1])
    with pytest.raises(ValueError, match="needs the model transform"):
        obj(tiny_unet(), x, y, schedule)
    out = obj(group_expert_lora(tiny_unet()), x, y, schedule)
    assert torch.isfinite(out.loss)
    ge = group_expert_lora(tiny_unet(), class_counts=[1, 3, 5])
    assert ge.expert_router.splits == ["few", "medium", "many"]
    obj.setup([1, 3, 5])
    assert torch.isfinite(obj(ge, x, y, schedule).loss)
