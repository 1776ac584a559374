"""IMBA, PD-CBDM (with TSA), CORAL and overlap optimization against float64 recomputations of
their formulas written out here, their settings' errors, and a short training run of each."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.methods import (
    CBDMObjective,
    CORALObjective,
    DDPMObjective,
    IMBAObjective,
    OverlapObjective,
    PDCBDMObjective,
    head_tail_split,
    imba_distance,
    overlap_timestep_weights,
    supcon_loss,
)
from lt_diffusion.models.unet import SelfAttention, TimestepSelfAttention, UNet
from tests.conftest import CONFIG_DIR, compose_config
from tests.objectives import AlwaysDrop, toy_batch, train_losses

T = 1000
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(torch.nn.Module):
    """A tiny float64 'network' on (B, 1, 4, 4): ``eps = x W + b[y] + 1e-3 t``; row ``C`` of
    ``b`` is the null label. Its bottleneck is ``h[b, f, i, j] = u_f (x W)[b, 0, 2i, 2j] +
    e[y, f]`` (4 channels, 2x2)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_classes = num_classes
        self.null_label = num_classes
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(
            torch.randn(num_classes + 1, 4, generator=g, dtype=torch.float64)
        )
        self.u = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        self.e = torch.nn.Parameter(
            torch.randn(num_classes + 1, 4, generator=g, dtype=torch.float64)
        )
        self.calls = 0

    def formula(self, x, t, y):
        return x @ self.w + self.b[y][:, None, None, :] + 1e-3 * t[:, None, None, None]

    def bottleneck(self, x, y):
        xw = (x @ self.w)[:, 0, ::2, ::2]  # (B, 2, 2)
        return self.u[None, :, None, None] * xw[:, None] + self.e[y][:, :, None, None]

    def forward(self, x, t, y, aug_labels=None, return_bottleneck=False):
        self.calls += 1
        eps = self.formula(x, t, y)
        return (eps, self.bottleneck(x, y)) if return_bottleneck else eps


def schedule64() -> dict[str, torch.Tensor]:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alphas = 1 - betas
    return {"betas": betas, "alphas": alphas, "abar": torch.cumprod(alphas, 0)}


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    abar = schedule64()["abar"][t][:, None, None, None]
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters()]
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def _assert_grads(model: torch.nn.Module, got_loss, ref_loss) -> None:
    for a, b in zip(_grads(model, got_loss), _grads(model, ref_loss), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# IMBA


def test_imba_distance_readings_and_shapes() -> None:
    g = torch.Generator().manual_seed(1)
    n = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    e = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    d = (n - e).abs()
    tok = imba_distance(n, e, 0.8)
    assert tok.shape == (3, 5, 6)
    ref = torch.empty(3, 5, 6, dtype=torch.float64)
    for b in range(3):
        for i in range(5):
            for j in range(6):
                ref[b, i, j] = sum(float(d[b, c, i, j]) ** 0.8 for c in range(4)) / 4
    torch.testing.assert_close(tok, ref)
    after = imba_distance(n, e, 0.8, power="after_mean")
    torch.testing.assert_close(after, d.mean(1) ** 0.8)
    assert not torch.allclose(after, tok)  # Jensen: the two readings differ
    assert bool((after >= tok).all())  # x^0.8 is concave
    samp = imba_distance(n, e, 0.8, granularity="sample")
    assert samp.shape == (3,)
    torch.testing.assert_close(samp, (d**0.8).flatten(1).mean(1))
    torch.testing.assert_close(
        imba_distance(n, e, 0.8, "sample", "after_mean"), d.flatten(1).mean(1) ** 0.8
    )
    torch.testing.assert_close(imba_distance(n, e, 0.0), torch.ones(3, 5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="granularity"):
        imba_distance(n, e, granularity="pixel")
    with pytest.raises(ValueError, match="power"):
        imba_distance(n, e, power="before")


@pytest.mark.parametrize(
    "granularity,power,normalize,fused",
    [
        ("token", "elementwise", "none", True),
        ("token", "after_mean", "batch_mean", False),
        ("sample", "elementwise", "none", False),
        ("sample", "after_mean", "batch_mean", True),
    ],
)
def test_imba_loss_and_gradients_equal_formula(
    sched, granularity: str, power: str, normalize: str, fused: bool
) -> None:
    obj = IMBAObjective(
        gamma=0.8, lam=0.9, granularity=granularity, power=power, normalize=normalize,
        fused_forward=fused,
    )  # fmt: skip
    obj.setup([5, 3, 1])
    model = TinyNet()
    x0, y = toy_batch()
    torch.manual_seed(3)
    out, ctx = obj.compute(model, x0, y, sched)

    torch.manual_seed(3)
    t = torch.randint(0, T, (6,))
    eps = torch.randn_like(x0)
    x_t = noised(x0, t, eps)
    eps_c = model.formula(x_t, t, y)
    eps_u = model.formula(x_t, t, torch.full_like(y, 3))
    a = (eps - eps_u).detach().abs()
    dims = (1,) if granularity == "token" else (1, 2, 3)
    dist = (a**0.8).mean(dims) if power == "elementwise" else a.mean(dims) ** 0.8
    if normalize == "batch_mean":
        dist = dist / dist.mean()
    sq = (eps - eps_c) ** 2
    err = sq.mean(1) if granularity == "token" else sq.flatten(1).mean(1)
    cond = (dist * err).mean()
    uncond = ((eps - eps_u) ** 2).mean()
    ref = 0.9 * cond + 0.1 * uncond

    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["imba_cond"].double(), cond, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.terms["imba_uncond"].double(), uncond, rtol=1e-5, atol=1e-8)
    assert not ctx.dropped and torch.equal(ctx.y_in, y)
    _assert_grads(model, out.loss, ref)  # D carries no gradient


def test_imba_rejects_label_dropout_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="cond_drop_prob=0"):
        IMBAObjective(cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="normalize"):
        IMBAObjective(normalize="softmax")
    with pytest.raises(ValueError, match="lam"):
        IMBAObjective(lam=1.5)
    with pytest.raises(ValueError, match="granularity"):
        IMBAObjective(granularity="patch")


# ----------------------------------------------------------------------------------------------
# PD-CBDM


def test_head_tail_split_sorts_by_count_and_clamps() -> None:
    head, tail = head_tail_split([3, 5, 1, 2], 0.7)  # order 1, 0, 3, 2; round(2.8) = 3
    assert head.tolist() == [1, 0, 3] and tail.tolist() == [2]
    head, tail = head_tail_split([10] * 10, 0.7)
    assert head.tolist() == list(range(7)) and tail.tolist() == [7, 8, 9]
    assert head_tail_split([5, 3, 1], 0.01)[0].tolist() == [0]  # at least one head class
    assert head_tail_split([5, 3, 1], 0.99)[1].tolist() == [2]  # at least one tail class
    with pytest.raises(ValueError, match="at least 2 classes"):
        head_tail_split([5], 0.7)
    with pytest.raises(ValueError, match="head_ratio"):
        head_tail_split([5, 3], 1.0)


@pytest.mark.parametrize("fused", [True, False])
def test_pd_cbdm_loss_and_gradients_equal_formula(sched, fused: bool) -> None:
    counts = [3, 5, 1, 2]
    obj = PDCBDMObjective(tau=1.0, gamma=0.25, fused_forward=fused, cond_drop_prob=0.0)
    obj.setup(counts)
    model = TinyNet(num_classes=4)
    x0, y = toy_batch(8, classes=4)
    torch.manual_seed(5)
    out = obj(model, x0, y, sched)

    torch.manual_seed(5)
    t = torch.randint(0, T, (8,))
    eps = torch.randn_like(x0)
    inv = 1.0 / torch.tensor(counts, dtype=torch.float32)
    cdf = torch.cumsum(inv / inv.sum(), 0)
    u = torch.rand(8) * cdf[-1]
    y_bal = (u[:, None] >= cdf[None, :]).sum(1)
    # Head classes 1, 0, 3 (counts 5, 3, 2), tail class 2: each label drawn in proportion to
    # its class count within the group, by inverse CDF on the same uniform draws.
    head_cdf = torch.tensor([5.0, 8.0, 10.0])
    y_head = torch.tensor([1, 0, 3])[(torch.rand(8) * 10.0)[:, None].ge(head_cdf).sum(1)]
    torch.rand(8)  # the tail draw: one class, so always class 2
    y_tail = torch.full((8,), 2)
    x_t = noised(x0, t, eps)
    h, h_bal = model.formula(x_t, t, y), model.formula(x_t, t, y_bal)
    w = (t.double() / T)[:, None, None, None]
    cbdm = ((h - eps) ** 2).mean()
    cbdm = cbdm + (w * (h - h_bal.detach()) ** 2).mean()
    cbdm = cbdm + 0.25 * (w * (h.detach() - h_bal) ** 2).mean()
    s = schedule64()
    beta, alpha, abar = (s[k][t][:, None, None, None] for k in ("betas", "alphas", "abar"))

    def mu(e):
        return (x_t - beta / (1 - abar).sqrt() * e) / alpha.sqrt()

    d = (mu(model.formula(x_t, t, y_head)) - mu(model.formula(x_t, t, y_tail))) ** 2
    pd = (t.double() / T * torch.exp(-d.flatten(1).mean(1))).mean()
    ref = cbdm + 0.1 * pd

    assert float(pd.detach()) > 0
    assert model.calls == (1 if fused else 4)  # fused: the four label sets in one forward
    torch.testing.assert_close(out.terms["pd"].double(), pd, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    _assert_grads(model, out.loss, ref)


def test_pd_cbdm_head_and_tail_labels_follow_the_counts_within_each_group() -> None:
    """Algorithm 1, line 7: y_h ~ the head data's distribution, y_t ~ the tail data's, i.e. in
    proportion to the class counts inside each group; never a class of the other group."""
    counts = [5, 100, 1, 60, 30, 2, 20, 8, 10, 3]  # not sorted by index: grouping is by count
    obj = PDCBDMObjective()
    obj.setup(counts)
    head = [1, 3, 4, 6, 8, 7, 0]  # the 7 most frequent: 100, 60, 30, 20, 10, 8, 5
    assert obj.head_classes.tolist() == head and obj.tail_classes.tolist() == [9, 5, 2]
    torch.manual_seed(0)
    n = 200_000
    y_head, y_tail = obj.head_tail_labels(n)
    assert y_head.dtype == y_tail.dtype == torch.long and y_head.shape == y_tail.shape == (n,)
    for labels, group in ((y_head, head), (y_tail, [9, 5, 2])):
        assert set(labels.unique().tolist()) == set(group)  # every class of the group, no other
        observed = torch.bincount(labels, minlength=10)[group].double()
        expected = torch.tensor([counts[c] for c in group], dtype=torch.float64)
        expected = n * expected / expected.sum()
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        dof = len(group) - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), (group, chi2)  # chi-square, ~6 sigma


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pd_cbdm_label_draw_never_syncs_with_the_host() -> None:
    obj = PDCBDMObjective().to("cuda")
    obj.setup([100, 60, 30, 20, 10, 8, 5, 3, 2, 1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y_head, y_tail = obj.head_tail_labels(64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y_head.is_cuda and bool((y_head < 7).all()) and bool((y_tail >= 7).all())


def test_pd_cbdm_switches(sched) -> None:
    """Without the distinguish loss PD-CBDM is CBDM with inverse-frequency target labels."""
    model = TinyNet()
    x0, y = toy_batch()
    obj = PDCBDMObjective(use_pd_loss=False, cond_drop_prob=0.0)
    cbdm = CBDMObjective(target_dist="inverse", cond_drop_prob=0.0)
    obj.setup([5, 3, 1])
    cbdm.setup([5, 3, 1])
    torch.manual_seed(2)
    a = obj(model, x0, y, sched)
    torch.manual_seed(2)
    b = cbdm(model, x0, y, sched)
    torch.testing.assert_close(a.loss, b.loss)
    assert float(a.terms["pd"]) == 0.0
    assert PDCBDMObjective().target_dist == "inverse"
    with pytest.raises(ValueError, match="head_ratio"):
        PDCBDMObjective(head_ratio=0.0)
    with pytest.raises(ValueError, match="pd_weight"):
        PDCBDMObjective(pd_weight=-1.0)
    with pytest.raises(ValueError, match=r"tail group \[2\] has no training images.*head_ratio"):
        PDCBDMObjective().setup([5, 3, 0])


PD_CBDM_GUIDANCE = {"cifar100_lt": 1.4, "cifar10_lt": 1.2}  # the paper's Sec. 4.3.4


@pytest.mark.parametrize(
    "row", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment" / "pd_cbdm").glob("*.yaml"))
)
def test_pd_cbdm_rows_sample_with_the_papers_guidance(row: str) -> None:
    cfg = compose_config("train", [f"experiment=pd_cbdm/{row}"])
    assert cfg.sampler.guidance == PD_CBDM_GUIDANCE[cfg.dataset.name], row
    if "tsa_resolutions" in cfg.model and list(cfg.model.tsa_resolutions):
        assert list(cfg.model.tsa_resolutions) == [16] and cfg.model.tsa_heads == 8


def test_pd_cbdm_ablation_table_rows_are_cifar100_lt_rows() -> None:
    """The ablation (paper Sec. 4.3.1, CIFAR-100-LT) samples all its rows at 1.4."""
    table = OmegaConf.load(Path(CONFIG_DIR) / "table" / "pd_cbdm_ablation.yaml")
    rows = [r.experiment for block in table.blocks for r in block.rows]
    assert len(rows) == 5 and all(r.startswith("pd_cbdm/cifar100_lt_ir100_") for r in rows)


# ----------------------------------------------------------------------------------------------
# TSA


@pytest.mark.parametrize("heads", [1, 8])
def test_tsa_with_zero_projections_is_plain_attention(heads: int) -> None:
    torch.manual_seed(0)
    plain = SelfAttention(32, 16, num_heads=heads).double()
    tsa = TimestepSelfAttention(32, 16, num_heads=heads).double()
    missing, unexpected = tsa.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(
        f"{p}_t.{w}" for p in "qkv" for w in ("weight", "bias")
    )
    with torch.no_grad():  # give the attention a visible effect
        tsa.out.weight.copy_(torch.randn_like(tsa.out.weight) * 0.1)
        plain.out.weight.copy_(tsa.out.weight)
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    temb = torch.randn(2, 16, dtype=torch.float64)
    torch.testing.assert_close(tsa(x, temb), plain(x, temb))

    for name in ("q_t", "k_t", "v_t"):
        torch.nn.init.normal_(getattr(tsa, name).weight, std=0.5)
    out1, out2 = tsa(x, temb), tsa(x, temb * 2.0)
    assert not torch.allclose(out1, out2)  # the output depends on temb
    assert not torch.allclose(out1, plain(x, temb))
    # q, k, v written out: each projection plus its temb projection, broadcast over positions;
    # then each head (channels n d .. (n+1) d - 1, d = 32 / heads) attends with 1 / sqrt(d).
    h = tsa.norm(x)
    qkv = [getattr(tsa, n)(h) + getattr(tsa, n + "_t")(temb)[:, :, None, None] for n in "qkv"]
    q, k, v = (z.flatten(2).transpose(1, 2) for z in qkv)  # (B, N, C)
    d = 32 // heads
    att = torch.cat(
        [
            torch.softmax(q[..., p] @ k[..., p].transpose(1, 2) / math.sqrt(d), dim=-1) @ v[..., p]
            for p in (slice(n * d, (n + 1) * d) for n in range(heads))
        ],
        dim=-1,
    )
    ref = x + tsa.out(att.transpose(1, 2).reshape(2, 32, 4, 4))
    torch.testing.assert_close(out1, ref)
    assert TimestepSelfAttention(32, 16).num_heads == 8  # the PD-CBDM authors' head count


def test_unet_tsa_resolutions() -> None:
    kw = dict(image_size=8, in_channels=1, ch=32, ch_mult=[1, 2], num_res_blocks=1,
              num_classes=4, attn_resolutions=[8, 4])  # fmt: skip
    base = UNet(**kw)
    assert sum(p.numel() for p in base.parameters()) == sum(
        p.numel() for p in UNet(**kw, tsa_resolutions=[]).parameters()
    )
    assert not any(isinstance(m, TimestepSelfAttention) for m in base.modules())
    net = UNet(**kw, tsa_resolutions=[4])
    for blk in [*net.down, *net.up]:
        attn = getattr(blk, "attn", None)
        if attn is not None:  # the block's width tells its level: 32 at 8 px, 64 at 4 px
            at_4px = blk.conv2.out_channels == 64
            assert isinstance(attn, TimestepSelfAttention) == at_4px
    assert not isinstance(net.mid[0].attn, TimestepSelfAttention)
    n_tsa = sum(isinstance(m, TimestepSelfAttention) for m in net.modules())
    assert n_tsa == 3  # one down block and two up blocks at 4 px
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 700])
    y = torch.tensor([0, 2])
    torch.manual_seed(0)
    plain = UNet(**kw, dropout=0.0)
    torch.manual_seed(0)
    with_tsa = UNet(**kw, dropout=0.0, tsa_resolutions=[4])
    missing, _ = with_tsa.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(m.split(".")[-2] in ("q_t", "k_t", "v_t") for m in missing)
    torch.testing.assert_close(with_tsa(x, t, y), plain(x, t, y))
    with pytest.raises(ValueError, match="tsa_resolutions"):
        UNet(**kw, tsa_resolutions=[16])


# ----------------------------------------------------------------------------------------------
# CORAL


def supcon_loop(z: torch.Tensor, labels: list[int], tau: float, valid: list[bool]) -> float:
    """Khosla et al. (2020) eq. 2 with plain loops in float64."""
    idx = [i for i in range(len(labels)) if valid[i]]
    total, anchors = 0.0, 0
    for i in idx:
        pos = [p for p in idx if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        den = sum(math.exp(float(z[i] @ z[a]) / tau) for a in idx if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / den) for p in pos) / len(pos)
        anchors += 1
    return total / anchors if anchors else 0.0


def test_supcon_equals_double_loop() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    labels = [0, 1, 0, 2, 1, 0, 3, 2, 1]  # class 3 has no positive
    valid = [True] * 9
    got = supcon_loss(z, torch.tensor(labels), 0.1)
    torch.testing.assert_close(
        got, torch.tensor(supcon_loop(z, labels, 0.1, valid), dtype=torch.float64)
    )
    valid = [True, True, False, True, True, True, True, False, True]
    got = supcon_loss(z, torch.tensor(labels), 0.5, torch.tensor(valid))
    torch.testing.assert_close(
        got, torch.tensor(supcon_loop(z, labels, 0.5, valid), dtype=torch.float64)
    )
    # no positive pair at all: 0, and a finite gradient
    zz = z.clone().requires_grad_(True)
    loss = supcon_loss(zz, torch.arange(9), 0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool(torch.isfinite(zz.grad).all())
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(z, torch.tensor(labels), 0.0)


def test_coral_loss_and_gradients_equal_formula(sched) -> None:
    obj = CORALObjective(base=DDPMObjective(cond_drop_prob=0.0), feature_dim=4, proj_dim=3)
    obj.double()
    obj.setup([5, 3, 1])
    model = TinyNet()
    x0, y = toy_batch(8)
    torch.manual_seed(7)
    out = obj(model, x0, y, sched)

    torch.manual_seed(7)
    t = torch.randint(0, T, (8,))
    eps = torch.randn_like(x0)
    x_t = noised(x0, t, eps)
    ddpm = ((model.formula(x_t, t, y) - eps) ** 2).mean()
    pooled = model.bottleneck(x_t, y).mean(dim=(2, 3))
    z = pooled @ obj.proj.weight.T + obj.proj.bias
    z = z / z.norm(dim=1, keepdim=True)
    sup = supcon_loop(z.detach(), y.tolist(), 0.1, [True] * 8)
    w_t = torch.exp((1 - t.double() / T) / 0.3).mean()
    torch.testing.assert_close(out.terms["supcon"].double(), torch.tensor(sup, dtype=torch.float64))
    assert model.calls == 1  # the bottleneck is the base's own forward's
    ref = ddpm + 0.5 * w_t * supcon_loss(z, y, 0.1)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    got = torch.autograd.grad(out.loss, [model.w, model.u, obj.proj.weight])
    want = torch.autograd.grad(ref, [model.w, model.u, obj.proj.weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    assert float(got[2].abs().sum()) > 0  # the projection head is trained


def test_coral_over_a_fused_base_takes_the_features_of_one_more_forward(sched) -> None:
    """CBDM's two label sets in one forward do not give the features of ``(x_t, t, y_in)``
    alone: CORAL runs one more forward, and the loss is that of the unfused base (whose first
    forward CORAL reads)."""
    losses, calls = [], []
    for fused in (True, False):
        base = CBDMObjective(tau=1.0, fused_forward=fused, cond_drop_prob=0.0)
        torch.manual_seed(0)  # the projection head's initial weights
        obj = CORALObjective(base=base, feature_dim=4, proj_dim=3).double()
        obj.setup([5, 3, 1])
        model = TinyNet()
        x0, y = toy_batch(8)
        torch.manual_seed(3)
        losses.append(obj(model, x0, y, sched).loss)
        calls.append(model.calls)
    assert calls == [2, 2]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)


def test_coral_skips_dropped_batches_and_checks_width(sched) -> None:
    obj = CORALObjective(base=DDPMObjective(cond_drop_prob=0.5), feature_dim=4).double()
    obj.setup([5, 3, 1])
    obj.base._host_rng = AlwaysDrop()
    model = TinyNet()
    x0, y = toy_batch()
    out = obj(model, x0, y, sched)
    assert model.calls == 1 and float(out.terms["supcon"]) == 0.0
    assert out.loss is not None and torch.equal(out.loss, out.terms["base"].to(out.loss.dtype))
    wrong = CORALObjective(base=DDPMObjective(cond_drop_prob=0.0), feature_dim=8).double()
    wrong.setup([5, 3, 1])
    with pytest.raises(ValueError, match="feature_dim=4"):
        wrong(model, x0, y, sched)
    assert CORALObjective(backbone_ch=128, backbone_ch_mult=[1, 2, 2, 2]).feature_dim == 256
    with pytest.raises(ValueError, match="bottleneck width"):
        CORALObjective()


# ----------------------------------------------------------------------------------------------
# Overlap optimization


def test_overlap_timestep_weights(sched) -> None:
    s = schedule64()
    sigma2 = s["betas"]
    w = s["betas"] ** 2 / (2 * sigma2 * s["alphas"] * (1 - s["abar"]))
    w = w / w.mean()
    torch.testing.assert_close(overlap_timestep_weights(sched), w)
    assert float(overlap_timestep_weights(sched).mean()) == pytest.approx(1.0)


@pytest.mark.parametrize("detach_negative,fused", [(False, True), (True, False)])
def test_overlap_loss_and_gradients_equal_formula(
    sched, detach_negative: bool, fused: bool
) -> None:
    obj = OverlapObjective(
        weight=0.3, margin=0.697, detach_negative=detach_negative, fused_forward=fused,
        cond_drop_prob=0.0,
    )  # fmt: skip
    obj.setup([5, 3, 1])
    model = TinyNet()
    x0, y = toy_batch(8)
    torch.manual_seed(9)
    out = obj(model, x0, y, sched)

    torch.manual_seed(9)
    t = torch.randint(0, T, (8,))
    eps = torch.randn_like(x0)
    k = torch.randint(1, 3, (8,))
    y_neg = (y + k) % 3
    assert bool((y_neg != y).all())
    x_t = noised(x0, t, eps)
    e, e_neg = model.formula(x_t, t, y), model.formula(x_t, t, y_neg)
    if detach_negative:
        e_neg = e_neg.detach()
    s = schedule64()
    w = s["betas"] / (2 * s["alphas"] * (1 - s["abar"]))
    w = (w / w.mean())[t]
    d = ((e - e_neg) ** 2).flatten(1).mean(1)
    hinge = torch.clamp(0.697 - d, min=0.0)
    assert 0 < int((hinge > 0).sum()) < 8  # the margin is active for some samples only
    overlap = (w * hinge).mean()
    ref = ((e - eps) ** 2).mean() + 0.3 * overlap
    torch.testing.assert_close(out.terms["overlap"].double(), overlap, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-8)
    _assert_grads(model, out.loss, ref)


def test_overlap_negative_labels_are_uniform_over_other_classes() -> None:
    from lt_diffusion.methods import negative_labels

    torch.manual_seed(0)
    y = torch.full((6000,), 2)
    neg = negative_labels(y, 4)
    assert bool((neg != 2).all())
    freq = torch.bincount(neg, minlength=4).double() / 6000
    torch.testing.assert_close(
        freq[[0, 1, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0
    )
    with pytest.raises(ValueError, match="at least 2 classes"):
        negative_labels(torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="margin"):
        OverlapObjective(margin=-1.0)


# ----------------------------------------------------------------------------------------------
# Short training runs


@pytest.mark.parametrize(
    "make,tsa,falls",
    [
        (lambda: IMBAObjective(), False, ["loss"]),
        (lambda: IMBAObjective(granularity="sample"), False, ["loss"]),
        (lambda: PDCBDMObjective(), True, ["loss"]),
        # CORAL's total is dominated by the random weight mean_b exp((1 - t/T) / 0.3), and
        # SupCon has a positive floor (about log |P(i)|): check its parts instead.
        (lambda: CORALObjective(base=CBDMObjective(), feature_dim=64), False, ["base", "supcon"]),
        (lambda: OverlapObjective(), False, ["loss"]),
    ],
    ids=["imba", "imba_sample", "pd_cbdm_tsa", "cbdm_coral", "overlap"],
)
def test_short_training_lowers_the_loss(make, tsa: bool, falls: list[str]) -> None:
    series = train_losses(make(), steps=40, lr=2e-3, tsa=tsa)
    for key in falls:
        s = series[key]
        assert bool(torch.isfinite(s).all())
        factor = 0.7 if key != "supcon" else 0.95
        assert float(s[-8:].mean()) < factor * float(s[:8].mean()), (key, s)
