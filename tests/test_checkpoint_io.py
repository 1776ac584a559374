"""Checkpoint writes are atomic and the EMA update is the formula."""

from __future__ import annotations

import pytest
import torch

from lt_diffusion.models.ema import ema_update
from lt_diffusion.runs.checkpoint import AtomicCheckpointIO


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert torch.load(path)["step"] == 1


def test_ema_update_matches_formula() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.fill_(2.0)
    expected = [
        0.9 * e.detach().clone() + 0.1 * p.detach()
        for e, p in zip(ema.parameters(), model.parameters())
    ]
    ema_update(ema, model, 0.9)
    for e, x in zip(ema.parameters(), expected):
        torch.testing.assert_close(e, x)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
