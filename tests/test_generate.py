"""Deterministic, split-invariant generation and the uint8 conversion."""

from __future__ import annotations

import pytest
import torch

from lt_diffusion.diffusion import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    balanced_labels,
    chunk_ranges,
    gather_order,
    generate,
    to_uint8,
)
from lt_diffusion.diffusion.generate import chunk_seed, rank_count


class TinyNet(torch.nn.Module):
    """A small class-conditional conv net with dropout (so eval mode matters)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = num_classes
        self.null_label = num_classes
        self.emb = torch.nn.Embedding(num_classes + 1, 3)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        h = x + self.emb(y)[:, :, None, None] + 1e-3 * t[:, None, None, None]
        return self.drop(torch.tanh(self.conv(h)))


SHAPE = (3, 4, 4)


def _run(model, sampler, labels, **kw) -> torch.Tensor:
    kw.setdefault("seed", 0)
    kw.setdefault("batch_size", 4)
    return generate(model, sampler, labels, image_shape=SHAPE, **kw)


@pytest.fixture
def sampler() -> DDIMSampler:
    # eta > 0: the per-step noise must come from the chunk's generator as well.
    return DDIMSampler(NoiseSchedule(100), steps=5, eta=1.0)


def test_balanced_labels() -> None:
    labels = balanced_labels(5, 3)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert torch.bincount(balanced_labels(10, 7)).tolist() == [7] * 10
    with pytest.raises(ValueError, match="n_per_class"):
        balanced_labels(3, 0)
    with pytest.raises(ValueError, match="num_classes"):
        balanced_labels(0, 3)


def test_to_uint8_values_and_round_trip() -> None:
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(u.double() / 127.5 - 1), u)
    assert torch.equal(to_uint8(u.float() / 127.5 - 1), u)
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0])
    # round((x + 1) * 127.5), clamped: 0, 0, 0, round(127.5) = 128 (half to even), 191, 255, 255
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    with pytest.raises(TypeError, match="float images"):
        to_uint8(u)


def test_same_seed_same_images_different_seed_different(sampler) -> None:
    model = TinyNet()
    labels = balanced_labels(4, 3)
    a = _run(model, sampler, labels, seed=1)
    b = _run(model, sampler, labels, seed=1)
    c = _run(model, sampler, labels, seed=2)
    assert a.dtype == torch.uint8 and a.shape == (12, *SHAPE) and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Different chunks get different noise (no repeated images inside a run).
    assert not torch.equal(a[:4], a[4:8])


def test_labels_condition_the_images(sampler) -> None:
    model = TinyNet()
    a = _run(model, sampler, torch.zeros(4, dtype=torch.long))
    b = _run(model, sampler, torch.full((4,), 3, dtype=torch.long))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("n", [23, 8, 3])
def test_split_over_ranks_equals_single_process(sampler, world_size: int, n: int) -> None:
    model = TinyNet()
    labels = torch.arange(n) % 4
    full = _run(model, sampler, labels, seed=7, guidance=1.5)
    parts = [
        _run(model, sampler, labels, seed=7, guidance=1.5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for r, part in enumerate(parts):
        assert part.shape[0] == rank_count(n, 4, r, world_size)
    assert torch.equal(gather_order(parts, n, 4), full)
    # Padding added for an equal-size all_gather is ignored.
    padded = [torch.cat([p, torch.zeros(4, *SHAPE, dtype=torch.uint8)]) for p in parts]
    assert torch.equal(gather_order(padded, n, 4), full)


def test_chunk_ranges_partition_the_labels() -> None:
    n, bs = 23, 4
    for ws in (1, 2, 3, 7):
        ranges = [r for rank in range(ws) for r in chunk_ranges(n, bs, rank, ws)]
        covered = sorted(i for start, end in ranges for i in range(start, end))
        assert covered == list(range(n))
        assert all(start % bs == 0 and end - start <= bs for start, end in ranges)
    assert chunk_ranges(23, 4, 1, 3) == [(4, 8), (16, 20)]
    assert chunk_ranges(0, 4, 0, 1) == []
    with pytest.raises(ValueError, match="rank"):
        chunk_ranges(10, 4, 3, 3)
    with pytest.raises(ValueError, match="batch_size"):
        chunk_ranges(10, 0, 0, 1)


def test_chunk_seeds_are_stable_and_distinct() -> None:
    seeds = {chunk_seed(s, k) for s in range(10) for k in range(100)}
    assert len(seeds) == 1000
    assert all(0 <= v < 2**63 for v in seeds)
    assert chunk_seed(3, 5) == chunk_seed(3, 5)


def test_generate_with_ddpm_and_restores_training_mode() -> None:
    model = TinyNet().train()
    sampler = DDPMSampler(NoiseSchedule(20))
    labels = balanced_labels(4, 2)
    a = _run(model, sampler, labels, batch_size=3)
    b = _run(model, sampler, labels, batch_size=3)
    # Dropout would make the two runs differ if the model were not put in eval mode.
    assert torch.equal(a, b)
    assert model.training
    assert model.calls == 2 * 3 * 20  # 3 chunks x 20 steps, twice


def test_rank_with_no_chunk_returns_empty(sampler) -> None:
    out = _run(TinyNet(), sampler, torch.arange(3), rank=1, world_size=2)
    assert out.shape == (0, *SHAPE) and out.dtype == torch.uint8


def test_bad_generate_inputs_are_refused(sampler) -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=4\)"):
        _run(model, sampler, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="1-D integer"):
        _run(model, sampler, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="image_shape"):
        generate(model, sampler, torch.tensor([0]), seed=0, batch_size=2, image_shape=(4, 4))
    with pytest.raises(ValueError, match="gather_order|rank 0 returned"):
        gather_order([torch.zeros(1, *SHAPE)], 5, 4)
