"""Stable Diffusion + LoRA (the CM paper's Table 6 setting) on a tiny randomly initialised
Stable Diffusion saved in the diffusers layout: folder checks, prompt encoding, LoRA
initialisation, CM's expert switch, merging, checkpoints, and train -> checkpoint -> load ->
sample -> evaluate (with and without theta_g) end to end. Nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lt_diffusion.models import (
    ExpertAdapterSwitch,
    StableDiffusionBackbone,
    add_expert_adapter,
    merge_lora,
)
from lt_diffusion.models.lowrank import lowrank_layers, set_expert_enabled, theta_g_only
from lt_diffusion.runs.checkpoint import read_checkpoint
from lt_diffusion.runs.load import load_exported, load_sampling_model
from tests.conftest import CONFIG_DIR, assert_same_state, compose_config, tiny_eval
from tests.fakedata import SD_MAX_LEN as MAX_LEN
from tests.fakedata import write_tiny_sd

NAMES = ["art_nouveau", "baroque", "realism"]
SCHEDULE = {"num_timesteps": 1000, "kind": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def build(folder: Path, rank: int = 4, expert: int | None = 2, **kw) -> StableDiffusionBackbone:
    model = StableDiffusionBackbone(
        str(folder), image_size=32, num_classes=3, class_names=NAMES, lora={"rank": rank},
        schedule=SCHEDULE, **kw,
    )  # fmt: skip
    return add_expert_adapter(model, rank=expert) if expert else model


def _inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, 4, 16, 16, generator=g),
        torch.tensor([3, 400, 999, 10])[:n],
        (torch.tensor([0, 1, 2, 3])[:n]),
    )


def _fill(model: nn.Module, which: str, std: float = 0.05) -> None:
    """Give every ``lora_B.<which>`` factor non-zero values (as training would)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{which}." in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def test_missing_folder_and_parts_say_what_is_expected(sd_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        build(tmp_path / "nowhere")
    msg = str(err.value)
    assert "does not exist" in msg
    for part in ("unet/", "text_encoder/", "tokenizer/", "vae/", "scheduler/"):
        assert part in msg
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    (broken / "tokenizer" / "merges.txt").unlink()
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks tokenizer, vae\."):
        build(broken)


def test_schedule_must_match_the_pretrained_scheduler(sd_folder: Path) -> None:
    with pytest.raises(ValueError, match="diffusion.kind=linear") as err:
        StableDiffusionBackbone(
            str(sd_folder), 32, 3, schedule={**SCHEDULE, "kind": "scaled_linear"}
        )
    assert "diffusion.beta_start=0.0001" in str(err.value)


def test_prompts_are_the_papers_template_encoded_once(sd_folder: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    model = build(sd_folder, expert=None)
    assert model.prompts(NAMES) == [
        "a art nouveau painting", "a baroque painting", "a realism painting", "",
    ]  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()
    ids = tokenizer(
        model.prompts(NAMES),
        padding="max_length",
        max_length=MAX_LEN,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        want = encoder(ids).last_hidden_state
    torch.testing.assert_close(model.prompt_embeds, want)
    assert model.null_label == 3  # the last row: the empty prompt

    late = StableDiffusionBackbone(str(sd_folder), 32, 3, lora={"rank": 4})
    with pytest.raises(RuntimeError, match="set_class_names"):
        late(*_inputs())
    late.set_class_names(NAMES)
    torch.testing.assert_close(late.prompt_embeds, want)
    with pytest.raises(ValueError, match="one name per class"):
        late.set_class_names(NAMES[:2])


def test_zero_b_lora_leaves_the_pretrained_unet_unchanged(sd_folder: Path) -> None:
    from diffusers import UNet2DConditionModel

    model = build(sd_folder).eval()
    plain = UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    x, t, y = _inputs()
    with torch.no_grad():
        want = plain(x, t, encoder_hidden_states=model.prompt_embeds[y]).sample
        torch.testing.assert_close(model(x, t, y), want, rtol=0, atol=0)
        # Once the general adapter is non-zero, the output moves.
        _fill(model, "general")
        assert (model(x, t, y) - want).abs().max() > 1e-3


def test_only_lora_factors_train_and_checkpoints_hold_only_them(sd_folder: Path) -> None:
    model = build(sd_folder)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    targets = [n for n, m in model.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v"))]
    targets += [n for n, m in model.unet.named_modules() if n.endswith("to_out.0")]
    assert len(trainable) == len(targets) * 2 * 2  # A and B of two adapters per target layer
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for p in model.vae.parameters())
    state = model.state_dict()
    assert set(state) == {*trainable, "prompt_embeds", "_extra_state"}
    assert state["_extra_state"]["adapters"] == {"general": 4, "expert": 2}

    _fill(model, "general")
    _fill(model, "expert")
    fresh = build(sd_folder)
    fresh.load_state_dict(model.state_dict())  # strict: the frozen weights come from the folder
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, t, y), model.eval()(x, t, y))

    other = write_tiny_sd(sd_folder.parent / "other-sd", seed=1)
    with pytest.raises(RuntimeError, match="other pretrained weights"):
        build(other).load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="LoRA adapters"):
        build(sd_folder, expert=None).load_state_dict(model.state_dict(), strict=False)


def test_expert_switch_and_merge(sd_folder: Path) -> None:
    model = build(sd_folder).eval()
    switches = lowrank_layers(model)
    assert len(switches) == 1 and isinstance(switches[0], ExpertAdapterSwitch)
    with pytest.raises(ValueError, match="r_e < r_g"):
        add_expert_adapter(build(sd_folder, expert=None), rank=4)
    _fill(model, "general")
    x, t, y = _inputs()
    with torch.no_grad():
        general_only = model(x, t, y)  # the expert's B is still zero
        _fill(model, "expert")
        full = model(x, t, y)
        trained = model.state_dict()
        assert (full - general_only).abs().max() > 1e-3
        with theta_g_only(model) as n:
            theta_g = model(x, t, y)
        assert n == 1
        torch.testing.assert_close(theta_g, general_only, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x, t, y), full)  # restored after the block
        assert set_expert_enabled(model, False) == 1
        torch.testing.assert_close(model(x, t, y), general_only, rtol=1e-6, atol=1e-6)

        # Merging folds the adapters at their current scale: theta_g here...
        merge_lora(model)
        torch.testing.assert_close(model(x, t, y), general_only, rtol=1e-5, atol=1e-5)
        assert not lowrank_layers(model)
        attn = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert type(attn.to_q) is nn.Linear and type(attn.to_out[0]) is nn.Linear

        # ... and the full model when the expert is on.
        twin = build(sd_folder).eval()
        twin.load_state_dict(trained)
        merge_lora(twin)
        torch.testing.assert_close(twin(x, t, y), full, rtol=1e-5, atol=1e-5)
        assert "unet.conv_in.weight" in twin.state_dict()  # merged weights are saved in full


PROTOCOL = tiny_eval({"eval.metrics": "[fid,kid]", "eval.sampler.steps": 2})


def test_cm_lora_train_checkpoint_load_sample_and_evaluate(
    sd_folder: Path, train_overrides, tmp_path: Path
) -> None:
    from lt_diffusion import evaluate, train

    overrides = train_overrides(
        "model=sd_lora",
        f"model.pretrained={sd_folder}",
        "model.lora.rank=4",
        "model.lora.alpha=4",
        "model.latent_cache_dir=null",
        "method=cm_sd_lora",
        "method.model_transform.rank=2",
        "train.max_steps=2",
        f"paths.run_dir={tmp_path / 'run'}",
    )
    run_dir = train.run(compose_config("train", overrides))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]
    # Only the LoRA factors (and the prompt embeddings) of model and EMA are stored.
    weights = [k for k in state if not k.endswith(("_extra_state", "prompt_embeds"))]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    moved = [k for k in weights if k.startswith("model.") and "lora_B.expert" in k]
    assert any(state[k].abs().max() > 0 for k in moved)  # the expert adapter trained

    model, meta = load_sampling_model(ckpt)
    cifar_names = meta["dataset"]["class_names"]
    assert model.class_names == cifar_names and model.adapter_ranks == {"general": 4, "expert": 2}
    assert model.prompts(cifar_names)[0] == f"a {cifar_names[0].replace('_', ' ')} painting"
    # The export holds the same trained parts; the pretrained folder its config names gives
    # the rest (checked against the digest, as for the checkpoint).
    exported, _ = load_exported(run_dir / "export")
    assert_same_state(exported, model)
    assert exported.class_names == cifar_names and exported.adapter_ranks == model.adapter_ranks

    records = {}
    for theta_g in (False, True):
        cfg = compose_config(
            "evaluate",
            [f"checkpoint={ckpt}", f"paths.cache_dir={tmp_path / 'cache'}", *PROTOCOL,
             f"theta_g_only={str(theta_g).lower()}", f"record={tmp_path / f'{theta_g}.json'}"],
        )  # fmt: skip
        records[theta_g] = evaluate.run(cfg)
    for theta_g, record in records.items():
        assert record["checkpoint"]["theta_g_only"] is theta_g
        assert record["metrics"]["overall"]["n_generated"] == 10
        assert torch.isfinite(torch.tensor(record["metrics"]["overall"]["fid"]))


@pytest.mark.skipif(
    not (Path(CONFIG_DIR) / "dataset" / "artbench10.yaml").is_file(),
    reason="configs/dataset/artbench10.yaml is not in the tree yet",
)
@pytest.mark.parametrize("ir", [100, 50])
@pytest.mark.parametrize("method", ["ddpm", "cbdm", "oc", "cm"])
def test_table6_rows_compose_at_256_px(ir: int, method: str) -> None:
    cfg = compose_config("train", [f"experiment=cm/artbench10_ir{ir}_{method}"])
    assert cfg.model._target_.endswith("StableDiffusionBackbone") and cfg.model.lora.rank == 128
    assert cfg.model.image_size == cfg.dataset.image_size == 256
    assert cfg.imbalance.ratio == ir and cfg.method.name == method
    assert cfg.diffusion.kind == "scaled_linear" and cfg.sampler.sampler.steps == 50
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.weight_decay == 1e-6
    assert cfg.data.batch_size == 64
    transform = cfg.method.model_transform
    assert (transform.rank == 8) if method == "cm" else transform is None
