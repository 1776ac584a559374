"""Text-conditioned latent diffusion (CM paper Table G.11): the caption-embedding cache and the
text-conditioned U-Net (null embedding, bound captions, sampling per class, checkpoints, the
EMA copy, the text encoder not staged). The datasets: tests/test_text_datasets.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lt_diffusion.models.text_latent import (
    TextEncoderNotStagedError,
    TextLatentUNet,
    byte_tokenize,
    caption_embeddings,
    load_text_encoder,
)

TEXT = {
    "config": {
        "vocab_size": 258, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
        "num_hidden_layers": 2, "max_position_embeddings": 24,
    },
    "max_length": 24,
}  # fmt: skip
VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [32, 32],
    "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
}  # fmt: skip
UNET = {
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
    "attention_head_dim": 4, "norm_num_groups": 8,
}  # fmt: skip


def tiny(num_classes: int = 3, cache: Path | None = None, **text) -> TextLatentUNet:
    return TextLatentUNet(
        UNET, {**TEXT, **text}, None if cache is None else str(cache),
        image_size=16, image_channels=3, num_classes=num_classes, vae={"config": VAE},
    )  # fmt: skip


# -- the caption cache ------------------------------------------------------------------------
def test_caption_cache_is_computed_once_reused_and_keyed_by_content(tmp_path: Path) -> None:
    captions = ["a red bird", "a blue bird", "a red bird", "yellow petals"]
    encoder = load_text_encoder(**TEXT)
    unique, embeds, index = caption_embeddings(encoder, captions, tmp_path)
    assert encoder.calls == 1 and unique == sorted(set(captions)) and len(embeds) == 3
    assert [unique[i] for i in index] == captions
    # The embeddings are the encoder's, in float16 (an independent pass over the tokens).
    with torch.no_grad():
        ref = encoder.model(input_ids=byte_tokenize(unique, 24)).last_hidden_state
    torch.testing.assert_close(embeds.float(), ref, atol=2e-3, rtol=1e-3)
    files = list(tmp_path.glob("captions-*.pt"))
    assert len(files) == 1
    fresh = load_text_encoder(**TEXT)  # another process: same weights, nothing encoded yet
    _, again, _ = caption_embeddings(fresh, captions, tmp_path)
    assert fresh.calls == 0 and torch.equal(again, embeds)
    changed = [*captions[:-1], "yellow petals, green leaves"]
    _, other, _ = caption_embeddings(fresh, changed, tmp_path)
    assert fresh.calls == 1 and len(list(tmp_path.glob("captions-*.pt"))) == 2
    assert not torch.equal(other, embeds)
    other_weights = load_text_encoder(**TEXT, seed=1)
    caption_embeddings(other_weights, captions, tmp_path)
    assert other_weights.calls == 1  # the encoder's weights are part of the key


# -- the backbone -----------------------------------------------------------------------------
def test_null_label_is_the_empty_caption_and_bound_captions_condition_their_rows() -> None:
    model = tiny().eval()
    captions = ["red wings", "blue crown", "long tail", "yellow petals"]
    model.set_captions(captions, [0, 0, 1, 2])
    x, t = torch.randn(3, *model.latent_shape), torch.tensor([3, 300, 900])
    # The null embedding is CLIP's last hidden state of the empty caption (computed here
    # from the encoder directly: start and end tokens, end-padded).
    ids = torch.tensor([[0] + [1] * 23])
    with torch.no_grad():
        null = model.text.model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(model.null_embed, null)
        direct = model.unet(x, t, encoder_hidden_states=null.expand(3, -1, -1)).sample
        torch.testing.assert_close(model(x, t, torch.full((3,), 3)), direct)
        torch.testing.assert_close(model(x, t, None), direct)
        # Bound rows: sample i takes caption rows[i] where its label is that caption's class.
        y, rows = torch.tensor([0, 1, 3]), torch.tensor([1, 2, 0])
        with model.bound_captions(rows):
            eps = model(x, t, y)
            doubled = model.condition_rows(torch.cat([y, torch.full_like(y, 3)]))  # CFG batch
        states = torch.stack([model.caption_embeds[1].float(), model.caption_embeds[2].float(),
                              null])  # fmt: skip
        order = {c: i for i, c in enumerate(sorted(captions))}
        assert model.caption_index.tolist() == [order[c] for c in captions]
        states[0] = model.caption_embeds[order["blue crown"]].float()
        states[1] = model.caption_embeds[order["long tail"]].float()
        direct = model.unet(x, t, encoder_hidden_states=states).sample
        torch.testing.assert_close(eps, direct)
    assert doubled.tolist() == [1, 2, -1, -1, -1, -1]


def test_sampling_draws_captions_of_the_labels_class_from_the_seed() -> None:
    model = tiny()
    model.set_captions(["a", "b", "c", "d", "e"], [0, 0, 0, 1, 2])
    labels = torch.tensor([0] * 300 + [1, 2])
    rows = model.draw_captions(labels, torch.Generator().manual_seed(0))
    assert model.caption_class[rows].tolist() == labels.tolist()
    assert sorted(set(rows[:300].tolist())) == [0, 1, 2]  # uniform among the class's captions
    torch.testing.assert_close(rows, model.draw_captions(labels, torch.Generator().manual_seed(0)))
    model.set_captions(["a", "b"], [0, 0])
    with pytest.raises(ValueError, match=r"classes \[1\] have no training caption"):
        model.draw_captions(torch.tensor([1]))


def test_generation_is_deterministic_and_conditions_on_the_class(tmp_path: Path) -> None:
    from lt_diffusion.diffusion import NoiseSchedule
    from lt_diffusion.diffusion.generate import generate
    from lt_diffusion.diffusion.samplers import DDIMSampler

    model = tiny()
    model.set_captions(["red", "blue", "green"], [0, 1, 2])
    sampler = DDIMSampler(NoiseSchedule(num_timesteps=50), steps=2, clip_denoised=False)
    kw = {"seed": 0, "batch_size": 2, "image_shape": (3, 16, 16), "guidance": 1.5}
    a = generate(model, sampler, torch.tensor([0, 1, 2]), **kw)
    torch.testing.assert_close(a, generate(model, sampler, torch.tensor([0, 1, 2]), **kw))
    b = generate(model, sampler, torch.tensor([2, 1, 0]), **kw)
    assert not torch.equal(a[0], b[0])  # other class, other caption: another image


def test_checkpoint_keeps_the_captions_text_not_their_embeddings(tmp_path: Path) -> None:
    model = tiny(cache=tmp_path)
    model.set_captions(["red wings", "blue crown", "long tail"], [0, 1, 2])
    state = model.state_dict()
    assert not any("caption" in k or "null_embed" in k for k in state)
    restored = tiny(cache=tmp_path)
    restored.load_state_dict(state)
    assert restored.captions == model.captions and restored.text.calls == 1  # only ""
    assert restored.caption_embeds.numel() == 0  # embedded at first use, on its device then
    rows = restored.draw_captions(torch.tensor([2, 0]))
    assert rows.tolist() == [2, 0] and restored.text.calls == 1  # from the cache
    torch.testing.assert_close(restored.caption_embeds, model.caption_embeds)
    other = tiny(cache=tmp_path, seed=1)
    with pytest.raises(RuntimeError, match="another text encoder"):
        other.load_state_dict(state)


def test_ema_copy_shares_the_text_encoder_and_caption_tables() -> None:
    import copy

    model = tiny()
    ema = copy.deepcopy(model)
    assert ema.text is model.text
    model.set_captions(["red", "blue"], [0, 1])
    ema.set_captions(["red", "blue"], [0, 1], like=model)
    assert ema.caption_embeds.data_ptr() == model.caption_embeds.data_ptr()
    with pytest.raises(ValueError, match="other captions"):
        ema.set_captions(["red"], [0], like=model)
    clone = pickle.loads(pickle.dumps(model))  # tokenizers are picklable functions
    assert clone.captions == model.captions and clone.text.tokenize(["ab"]).shape == (1, 24)


def test_unstaged_text_encoder_names_the_key_and_what_to_stage(tmp_path: Path) -> None:
    with pytest.raises(TextEncoderNotStagedError, match="model.text_encoder.pretrained") as err:
        tiny(config=None, pretrained=str(tmp_path / "clip"))
    assert "vocab.json" in str(err.value) and "Nothing is downloaded" in str(err.value)


def test_unstaged_text_encoder_stops_a_run_before_the_data_is_read(tmp_path: Path) -> None:
    from lt_diffusion import train
    from tests.conftest import compose_config

    cfg = compose_config(
        "train",
        ["experiment=cm/cub200_ir10_ddpm", "model=ldm_text_tiny", "trainer=cpu", "logger=none",
         f"paths.data_root={tmp_path / 'nothing'}", f"paths.run_dir={tmp_path / 'run'}",
         "model.text_encoder.config=null", f"model.text_encoder.pretrained={tmp_path / 'clip'}"],
    )  # fmt: skip
    with pytest.raises(TextEncoderNotStagedError, match="model.text_encoder.pretrained"):
        train.run(cfg)


def test_a_training_step_conditions_each_sample_on_the_caption_the_stream_drew() -> None:
    from lt_diffusion.diffusion import NoiseSchedule
    from lt_diffusion.methods import DDPMObjective
    from lt_diffusion.training.module import DiffusionModule

    class Spy(DDPMObjective):
        def forward(self, model, x0, y, schedule):  # type: ignore[override]
            self.rows = model.condition_rows(y)
            return super().forward(model, x0, y, schedule)

    model = tiny()
    model.set_captions([f"caption {i}" for i in range(10)], [0] * 8 + [1, 2])
    spy = Spy(cond_drop_prob=0.0)
    module = DiffusionModule(model, spy, NoiseSchedule(num_timesteps=50), torch.optim.Adam)
    y, rows = torch.tensor([0, 0, 0, 0, 0, 2]), torch.tensor([7, 2, 5, 0, 3, 9])
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    with pytest.warns(UserWarning):  # self.log outside a Trainer
        loss = module.training_step((x, y, rows), 0)
    assert spy.rows.tolist() == rows.tolist() and loss.ndim == 0
    assert model._bound is None  # bound for the step only


def test_a_staged_clip_folder_loads_with_its_own_tokenizer(tmp_path: Path) -> None:
    """A local CLIP folder (text model and BPE tokenizer, as a download holds them) loads; its
    embeddings are the model's last hidden state of the tokenizer's padded ids."""
    import shutil

    from transformers import CLIPTokenizer

    from tests.fakedata import write_tiny_sd

    sd = write_tiny_sd(tmp_path / "sd", max_length=16)
    clip = tmp_path / "clip"
    shutil.copytree(sd / "text_encoder", clip)
    for f in (sd / "tokenizer").iterdir():
        shutil.copy(f, clip / f.name)
    encoder = load_text_encoder(pretrained=str(clip), max_length=77)
    assert encoder.max_length == 16  # capped at the tokenizer's (and the model's) context
    ids = CLIPTokenizer.from_pretrained(str(clip))(
        ["a bird"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref = encoder.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(encoder.encode(["a bird"]), ref)


def test_the_staged_clip_encoder_of_ldm_text_kl8() -> None:
    """Runs where the user staged the real text encoder (skipped otherwise, never faked): the
    embeddings are CLIP ViT-B/32's 77 x 512 last hidden states, as transformers' full
    CLIPModel computes them."""
    from transformers import CLIPModel, CLIPTokenizer

    from tests.conftest import compose_config

    folder = Path(
        compose_config(
            "train", ["model=ldm_text_kl8", "dataset=cub200"]
        ).model.text_encoder.pretrained
    )
    if not folder.is_dir():
        pytest.skip(
            f"no CLIP text encoder staged at {folder}: `huggingface-cli download "
            f"openai/clip-vit-base-patch32 --local-dir {folder}` (or set LT_DIFFUSION_PRETRAINED)"
        )
    encoder = load_text_encoder(pretrained=str(folder), max_length=77)
    captions = ["this bird has a red crown and black wings", ""]
    embeds = encoder.encode(captions)
    assert embeds.shape == (2, 77, 512)
    ids = CLIPTokenizer.from_pretrained(str(folder))(
        captions, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(str(folder)).text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(embeds, ref)
