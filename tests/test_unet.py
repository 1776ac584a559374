"""The Ho et al. U-Net: size, shapes, conditioning hooks, attention maths, errors, gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lt_diffusion.models import ATTENTION_BLOCKS, SelfAttention, UNet, timestep_embedding
from lt_diffusion.models.unet import TimestepSelfAttention

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"
TINY = dict(ch=32, ch_mult=(1, 2), attn_resolutions=(), num_res_blocks=1, dropout=0.0)


def _wake(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the near-zero (gain 1e-5) layers at full scale and give biases random values.

    At initialization those layers make every block an identity and the output ~1e-5, so
    equality checks would pass trivially; after this, outputs depend on every layer.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan = module.weight[0].numel()
                if module.weight.abs().max() < 1e-3:
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def _inputs(b: int, c: int, s: int, num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, s, s, generator=gen)
    t = torch.randint(0, 1000, (b,), generator=gen)
    y = torch.randint(0, num_classes, (b,), generator=gen)
    return x, t, y


def _ho_unet_param_count(
    ch: int,
    ch_mult: tuple[int, ...],
    attn_levels: set[int],
    nrb: int,
    in_ch: int,
    num_classes: int,
) -> int:
    """Parameters of Ho et al.'s U-Net, counted layer by layer from the paper's layout."""
    td = 4 * ch

    def conv(i: int, o: int, k: int) -> int:
        return i * o * k * k + o

    def gn(c: int) -> int:
        return 2 * c

    def attn(c: int) -> int:
        return gn(c) + 4 * conv(c, c, 1)

    def res(i: int, o: int, a: bool) -> int:
        n = gn(i) + conv(i, o, 3) + (td * o + o) + gn(o) + conv(o, o, 3)
        n += conv(i, o, 1) if i != o else 0
        return n + (attn(o) if a else 0)

    n = (ch * td + td) + (td * td + td) + (num_classes + 1) * td + conv(in_ch, ch, 3)
    skips, now = [ch], ch
    for lvl, m in enumerate(ch_mult):
        for _ in range(nrb):
            n += res(now, ch * m, lvl in attn_levels)
            now = ch * m
            skips.append(now)
        if lvl != len(ch_mult) - 1:
            n += conv(now, now, 3)
            skips.append(now)
    n += res(now, now, True) + res(now, now, False)
    for lvl, m in reversed(list(enumerate(ch_mult))):
        for _ in range(nrb + 1):
            n += res(skips.pop() + now, ch * m, lvl in attn_levels)
            now = ch * m
        if lvl != 0:
            n += conv(now, now, 3)
    return n + gn(now) + conv(now, in_ch, 3)


def test_cifar_config_has_the_papers_size() -> None:
    with torch.device("meta"):  # no memory or init cost for 36M parameters
        model = UNet()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    assert n == _ho_unet_param_count(128, (1, 2, 2, 2), {1}, 2, 3, 10)
    # Ho et al.'s normalisation: 32 groups in every GroupNorm (4 channels each at 128).
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    assert min(m.num_channels for m in norms) == 128


def test_small_config_param_count_matches_layout() -> None:
    model = UNet(
        image_size=28,
        in_channels=1,
        ch=32,
        ch_mult=(1, 2, 2),
        attn_resolutions=(14,),
        num_res_blocks=1,
    )
    n = sum(p.numel() for p in model.parameters())
    assert n == _ho_unet_param_count(32, (1, 2, 2), {1}, 1, 1, 10)
    assert 1e6 < n < 2e6


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_shape_equals_input_shape(channels: int, size: int) -> None:
    attn = (size // 2,)
    model = UNet(image_size=size, in_channels=channels, **{**TINY, "attn_resolutions": attn})
    x, t, y = _inputs(2, channels, size)
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_null_label_and_unconditional() -> None:
    model = _wake(UNet(image_size=32, in_channels=3, num_classes=5, **TINY)).eval()
    assert model.null_label == 5 and model.label_emb.num_embeddings == 6
    x, t, y = _inputs(3, 3, 32, num_classes=5)
    null = torch.full_like(y, model.null_label)
    with torch.no_grad():
        cond, uncond, none = model(x, t, y), model(x, t, null), model(x, t, None)
    assert (cond - uncond).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image changes
    torch.testing.assert_close(none, uncond, rtol=0, atol=0)


def test_label_is_added_to_time_embedding() -> None:
    model = UNet(image_size=28, in_channels=1, **TINY)
    x, t, y = _inputs(4, 1, 28)
    temb = model.embed(t, y, None)
    expected = model.time_mlp(timestep_embedding(t, 32)) + model.label_emb.weight[y]
    torch.testing.assert_close(temb, expected)


def test_timestep_embedding_matches_formula() -> None:
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 8).double()
    for i in range(4):
        freq = 10000.0 ** (-2 * i / 8)
        for b, step in enumerate(t.tolist()):
            assert emb[b, 2 * i].item() == pytest.approx(math.sin(step * freq), abs=1e-4)
            assert emb[b, 2 * i + 1].item() == pytest.approx(math.cos(step * freq), abs=1e-4)


def test_return_bottleneck() -> None:
    model = UNet(
        image_size=32,
        in_channels=3,
        ch=32,
        ch_mult=(1, 2, 4),
        attn_resolutions=(16,),
        num_res_blocks=1,
    )
    model.eval()
    x, t, y = _inputs(2, 3, 32)
    eps, h_mid = model(x, t, y, return_bottleneck=True)
    assert eps.shape == x.shape
    assert h_mid.shape == (2, 128, 8, 8) and model.bottleneck_channels == 128
    torch.testing.assert_close(eps, model(x, t, y))


@pytest.mark.parametrize("heads", [1, 4])
def test_channels_last_matches_contiguous(heads: int) -> None:
    model = _wake(
        UNet(
            image_size=32,
            in_channels=3,
            ch=32,
            ch_mult=(1, 2),
            attn_resolutions=(16,),
            num_res_blocks=1,
            attn_heads=heads,
        )
    )
    model.eval()
    x, t, y = _inputs(2, 3, 32)
    with torch.no_grad():
        ref = model(x, t, y)
        cl_model = model.to(memory_format=torch.channels_last)
        out = cl_model(x.to(memory_format=torch.channels_last), t, y)
    assert ref.abs().mean() > 1e-2  # the check below is not vacuous
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_attention_matches_explicit_softmax_in_float64() -> None:
    torch.manual_seed(0)
    c, hw = 64, 5
    block = _wake(SelfAttention(c, temb_dim=128)).double()
    nn.init.normal_(block.norm.weight, 1.0, 0.2)
    nn.init.normal_(block.norm.bias, 0.0, 0.2)
    x = torch.randn(2, c, hw, hw, dtype=torch.float64)
    out = block(x, torch.randn(2, 128, dtype=torch.float64))

    # Independent computation: tokens as rows, 1x1 convs as matrices. 64 channels: 16 groups
    # of 4 (at most 32 groups, at least 4 channels each).
    h = F.group_norm(x, 16, block.norm.weight, block.norm.bias, eps=block.norm.eps)
    tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)

    def lin(conv: nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
        return z @ conv.weight[:, :, 0, 0].T + conv.bias

    q, k, v = lin(block.q, tokens), lin(block.k, tokens), lin(block.v, tokens)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    expected = x + lin(block.out, weights @ v).transpose(1, 2).reshape(2, c, hw, hw)
    assert (expected - x).abs().mean() > 1e-2
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def _multi_head_reference(
    block: SelfAttention, x: torch.Tensor, temb: torch.Tensor, heads: int
) -> torch.Tensor:
    """Multi-head attention written out head by head (Vaswani et al. 2017, Sec. 3.2.2): head
    ``n`` attends with channels ``n d .. (n+1) d - 1`` of q, k, v, scale ``1 / sqrt(d)``; the
    heads' outputs are concatenated along channels before the output projection."""
    b, c, hw = x.shape[0], x.shape[1], x.shape[-1]
    d = c // heads
    groups = block.norm.num_groups
    h = F.group_norm(x, groups, block.norm.weight, block.norm.bias, eps=block.norm.eps)
    q, k, v = (z.flatten(2).transpose(1, 2) for z in block.project_qkv(h, temb))  # (B, N, C)
    outs = []
    for n in range(heads):
        part = slice(n * d, (n + 1) * d)
        w = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(w @ v[..., part])
    a = torch.cat(outs, dim=-1)  # (B, N, C)
    out = a @ block.out.weight[:, :, 0, 0].T + block.out.bias
    return x + out.transpose(1, 2).reshape(b, c, hw, hw)


@pytest.mark.parametrize("heads", [1, 4, 8])
def test_multi_head_attention_matches_float64_reference(heads: int) -> None:
    torch.manual_seed(0)
    c, hw = 64, 5
    block = _wake(SelfAttention(c, temb_dim=16, num_heads=heads)).double()
    nn.init.normal_(block.norm.weight, 1.0, 0.2)
    x = torch.randn(2, c, hw, hw, dtype=torch.float64)
    temb = torch.randn(2, 16, dtype=torch.float64)
    out = block(x, temb)
    expected = _multi_head_reference(block, x, temb, heads)
    assert (expected - x).abs().mean() > 1e-2
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    # A second implementation: torch's nn.MultiheadAttention with the same projections.
    mha = nn.MultiheadAttention(c, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([m.weight[:, :, 0, 0] for m in (block.q, block.k, block.v)])
        )
        mha.in_proj_bias.copy_(torch.cat([m.bias for m in (block.q, block.k, block.v)]))
        mha.out_proj.weight.copy_(block.out.weight[:, :, 0, 0])
        mha.out_proj.bias.copy_(block.out.bias)
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    theirs, _ = mha(tokens, tokens, tokens, need_weights=False)
    torch.testing.assert_close(
        out, x + theirs.transpose(1, 2).reshape_as(x), rtol=1e-10, atol=1e-10
    )


def test_multi_head_is_not_single_head() -> None:
    torch.manual_seed(0)
    one = _wake(SelfAttention(64, temb_dim=16, num_heads=1)).double()
    eight = SelfAttention(64, temb_dim=16, num_heads=8).double()
    eight.load_state_dict(one.state_dict())
    x, temb = torch.randn(2, 64, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    assert (one(x, temb) - eight(x, temb)).abs().max() > 1e-3


def test_unet_gives_each_attention_kind_its_head_count() -> None:
    model = UNet(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(16,),
                 num_res_blocks=1, tsa_resolutions=(8,), attn_heads=2, tsa_heads=4)  # fmt: skip
    blocks = [m for m in model.modules() if isinstance(m, SelfAttention)]
    tsa = [m for m in blocks if isinstance(m, TimestepSelfAttention)]
    plain = [m for m in blocks if not isinstance(m, TimestepSelfAttention)]
    assert len(tsa) == 3 and {m.num_heads for m in tsa} == {4}  # one down, two up at 8 px
    assert len(plain) == 3 + 1 and {m.num_heads for m in plain} == {2}  # 16 px + the middle
    # Defaults: Ho et al.'s single head for plain attention, 8 heads (PD-CBDM's code) for TSA.
    default = UNet(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(16,),
                   num_res_blocks=1, tsa_resolutions=(8,))  # fmt: skip
    heads = {
        type(m).__name__: m.num_heads for m in default.modules() if isinstance(m, SelfAttention)
    }
    assert heads == {"SelfAttention": 1, "TimestepSelfAttention": 8}


def test_attention_blocks_sit_at_the_requested_resolutions() -> None:
    model = UNet(
        image_size=32,
        in_channels=3,
        ch=32,
        ch_mult=(1, 2, 2),
        attn_resolutions=(16,),
        num_res_blocks=1,
    )
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[-1]))
        for m in model.modules()
        if isinstance(m, SelfAttention)
    ]
    x, t, y = _inputs(1, 3, 32)
    model(x, t, y)
    for hook in hooks:
        hook.remove()
    # down: 1 block at 16; middle at 8; up: 2 blocks at 16.
    assert sorted(seen) == [8, 16, 16, 16]


def test_aug_labels_none_equals_zeros() -> None:
    model = _wake(UNet(image_size=28, in_channels=1, augment_dim=9, **TINY)).eval()
    x, t, y = _inputs(2, 1, 28)
    with torch.no_grad():
        none = model(x, t, y)
        zeros = model(x, t, y, aug_labels=torch.zeros(2, 9))
        some = model(x, t, y, aug_labels=torch.randn(2, 9))
    torch.testing.assert_close(none, zeros, rtol=0, atol=0)
    assert (some - none).abs().max() > 1e-3
    assert model.aug_emb.bias is None


def test_every_parameter_gets_a_gradient() -> None:
    model = _wake(
        UNet(
            image_size=28,
            in_channels=1,
            ch=32,
            ch_mult=(1, 2),
            attn_resolutions=(14,),
            num_res_blocks=1,
            augment_dim=9,
            num_classes=3,
        )
    )
    x, t, _ = _inputs(4, 1, 28)
    y = torch.tensor([0, 1, 2, 3])  # every embedding row, the null row included
    loss = model(x, t, y, aug_labels=torch.randn(4, 9)).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_fresh_model_output_is_small_and_gradients_exist() -> None:
    # Ho et al.'s init: the final conv has gain 1e-5, so the initial prediction is ~0.
    model = UNet(image_size=28, in_channels=1, **TINY)
    x, t, y = _inputs(2, 1, 28)
    out = model(x, t, y)
    assert out.abs().max() < 1e-3
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_only_in_training() -> None:
    model = _wake(UNet(image_size=28, in_channels=1, **{**TINY, "dropout": 0.5}))
    x, t, y = _inputs(2, 1, 28)
    model.eval()
    torch.testing.assert_close(model(x, t, y), model(x, t, y))
    model.train()
    assert not torch.allclose(model(x, t, y), model(x, t, y))


def test_scalar_timestep_is_broadcast() -> None:
    model = _wake(UNet(image_size=28, in_channels=1, **TINY)).eval()
    x, _, y = _inputs(3, 1, 28)
    torch.testing.assert_close(model(x, torch.tensor(7), y), model(x, torch.full((3,), 7), y))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=28, ch_mult=(1, 2, 2, 2)), r"divisible by 8.*at most 3 entries"),
        (dict(image_size=32, attn_resolutions=(12,)), r"\[12\].*\[32, 16, 8, 4\]"),
        (dict(ch=33), r"model.ch must be a positive even number.*try 34"),
        (dict(ch=2), r"model.ch=2 is narrower.*norm_group_min_channels=4"),
        (dict(norm_groups=0), r"model.norm_groups"),
        (dict(attn_heads=3), r"model.attn_heads=3 does not divide the width 256"),
        (dict(tsa_resolutions=[16], tsa_heads=5), r"model.tsa_heads=5 does not divide.*256"),
        (dict(attn_heads=0), r"model.attn_heads must be a positive integer"),
        (dict(num_classes=0), r"num_classes must be >= 1"),
        (dict(attention="flash"), r"unknown attention 'flash'.*\['self', 'tsa'\]"),
        (dict(ch_mult=()), r"non-empty"),
        (dict(ch_mult=2), r"list of integers"),
        (dict(attn_resolutions=16), r"list of integers"),
        (dict(num_res_blocks=0), r"num_res_blocks"),
        (dict(dropout=1.0), r"dropout"),
        (dict(augment_dim=-1), r"augment_dim"),
    ],
)
def test_invalid_configs_raise_helpful_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_invalid_inputs_raise_helpful_errors() -> None:
    model = UNet(image_size=28, in_channels=1, **TINY)
    x, t, y = _inputs(2, 1, 28)
    with pytest.raises(ValueError, match=r"shape \(B, 1, H, W\)"):
        model(torch.randn(2, 3, 28, 28), t, y)
    with pytest.raises(ValueError, match=r"divisible by 2"):
        model(torch.randn(2, 1, 27, 27), t, y)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        model(x, t, y[:, None])
    with pytest.raises(ValueError, match=r"augment_dim=0"):
        model(x, t, y, aug_labels=torch.zeros(2, 9))


def test_registry_makes_a_new_attention_one_entry() -> None:
    class TimeAttention(SelfAttention):
        """A stand-in for TSA: q, k, v each get a projection of temb added."""

        def __init__(self, channels: int, temb_dim: int, **kwargs) -> None:
            super().__init__(channels, temb_dim, **kwargs)
            self.tq, self.tk, self.tv = (nn.Linear(temb_dim, channels) for _ in range(3))

        def project_qkv(self, h, temb):
            q, k, v = super().project_qkv(h, temb)
            return (
                q + self.tq(temb)[:, :, None, None],
                k + self.tk(temb)[:, :, None, None],
                v + self.tv(temb)[:, :, None, None],
            )

    ATTENTION_BLOCKS["test_tsa"] = TimeAttention
    try:
        model = UNet(
            image_size=32,
            in_channels=3,
            ch=32,
            ch_mult=(1, 2, 2),
            attn_resolutions=(16,),
            num_res_blocks=1,
            attention="test_tsa",
        )
    finally:
        del ATTENTION_BLOCKS["test_tsa"]
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, SelfAttention)]
    # The chosen kind at 16x16 (1 down, 2 up); the middle block keeps plain self-attention.
    assert kinds.count("TimeAttention") == 3 and kinds.count("SelfAttention") == 1
    x, t, y = _inputs(2, 3, 32)
    assert model(x, t, y).shape == x.shape


# unet_cifar needs a size divisible by 8 (no 28 px); unet_small attends at 14x14 (28 px only).
@pytest.mark.parametrize(
    "name,size,channels",
    [("unet_cifar", 32, 3), ("unet_small", 28, 1), ("unet_tiny", 28, 1), ("unet_tiny", 32, 3)],
)
def test_model_configs_instantiate(name: str, size: int, channels: int) -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml")
    cfg = OmegaConf.merge(
        {"dataset": {"image_size": size, "channels": channels, "num_classes": 10}},
        {"model": cfg},
    )
    ctx = torch.device("meta") if name == "unet_cifar" else torch.device("cpu")
    with ctx:
        model = instantiate(cfg.model)
    assert isinstance(model, UNet)
    assert (model.image_size, model.in_channels, model.num_classes) == (size, channels, 10)
    if name != "unet_cifar":
        x, t, y = _inputs(2, channels, size)
        assert model(x, t, y).shape == x.shape
