"""A finished run exports its EMA model as a plain safetensors file with the resolved config
beside it; ``load_exported`` rebuilds the model from them without reading a pickle, and it
computes what the checkpoint's EMA model computes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from lt_diffusion.runs.checkpoint import CheckpointError, model_state, read_checkpoint
from lt_diffusion.runs.load import load_exported, load_sampling_model
from tests.conftest import compose_config


def _no_pickles(*args, **kwargs):
    raise AssertionError("an export must load without unpickling anything")


def test_export_is_the_checkpoints_ema_model(train_overrides, tmp_path, monkeypatch) -> None:
    from lt_diffusion import train

    # CM: the exported weights are those of the transformed model (W = W_g + B A), which the
    # config rebuilds (method.model_transform).
    overrides = train_overrides(
        "method=cm", "train.max_steps=3", "train.ckpt_every=2", f"paths.run_dir={tmp_path / 'r'}"
    )
    run_dir = train.run(compose_config("train", overrides))
    export, last = run_dir / "export", run_dir / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "ema.safetensors"]

    # A plain safetensors file: its own API reads the tensors and the metadata.
    ema = model_state(read_checkpoint(last), ema=True)
    with safe_open(str(export / "ema.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == {k for k, v in ema.items() if torch.is_tensor(v)}
        assert all(torch.equal(f.get_tensor(k), ema[k]) for k in names)
        assert f.metadata()["global_step"] == "3"
    saved = OmegaConf.to_container(OmegaConf.load(export / "config.yaml"))
    assert saved == OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))

    monkeypatch.setattr(torch, "load", _no_pickles)
    monkeypatch.setattr(pickle, "load", _no_pickles)
    monkeypatch.setattr(pickle, "Unpickler", _no_pickles)
    model, meta = load_exported(export)
    monkeypatch.undo()
    ref, ref_meta = load_sampling_model(last)
    assert (meta["global_step"], meta["dataset"], meta["config"]) == (
        3,
        ref_meta["dataset"],
        ref_meta["config"],
    )
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 10, 500, 999]), None
    for labels in (torch.tensor([0, 3, 9, 1]), y):
        assert torch.equal(model(x, t, labels), ref(x, t, labels))


def test_export_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ema.safetensors and config.yaml missing"):
        load_exported(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "ema.safetensors")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="not an lt-diffusion export"):
        load_exported(tmp_path)
    (tmp_path / "ema.safetensors").write_bytes(b"\x10\x00 truncated")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_exported(tmp_path)


def test_no_export_when_switched_off(train_overrides, tmp_path) -> None:
    from lt_diffusion import train

    run_dir = tmp_path / "r"
    train.run(
        compose_config(
            "train",
            train_overrides("train.max_steps=1", "train.export=false", f"paths.run_dir={run_dir}"),
        )
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "export").exists()
