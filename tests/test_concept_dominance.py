"""The concept-dominance analysis (DominanceBench) on a tiny randomly initialised Stable
Diffusion written by the test: the cross-attention probe against diffusers' own processor and a
float64 recomputation, head ablations, concept token positions, the duplicated-concept shift,
multi-concept captions of the backbone, and the analysis record. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.analysis.attention import CrossAttentionProbe
from lt_diffusion.analysis.clip_score import CLIP_ENV, ClipScorer, clip_folder
from lt_diffusion.analysis.concept_dominance import (
    ConceptDominanceSettings,
    compute,
    lora_scaled,
    saturation,
    validate,
)
from lt_diffusion.analysis.prompts import ConceptPrompt, build_prompts, concept_positions
from lt_diffusion.models import StableDiffusionBackbone
from tests.conftest import compose_config
from tests.fakedata import write_tiny_sd

NAMES = ["art_nouveau", "baroque", "realism"]
SCHEDULE = {"num_timesteps": 1000, "kind": "linear", "beta_start": 1e-4, "beta_end": 0.02}
MAX_LEN = 48  # the tiny tokenizer spells words letter by letter: two styles need ~40 tokens


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster and does not thrash on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", max_length=MAX_LEN)


@pytest.fixture(scope="module")
def model(sd_folder: Path) -> StableDiffusionBackbone:
    return StableDiffusionBackbone(
        str(sd_folder), image_size=32, num_classes=3, class_names=NAMES, lora={"rank": 4},
        schedule=SCHEDULE,
    ).eval()  # fmt: skip


def _inputs(model: StableDiffusionBackbone, prompts: list[str], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 16, 16, generator=g)
    t = torch.full((len(prompts),), 500)
    return x, t, model.encode_prompts(prompts, keep_encoder=True)


def _masses_float64(attn: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor):
    """Each head's mean (over image positions) attention probability per token, recomputed in
    float64 from the layer's own projections: softmax(q k^T / sqrt(d))."""
    q = attn.to_q.double()(hidden.double())
    k = attn.to_k.double()(context.double())
    attn.to_q.float(), attn.to_k.float()
    b, heads = q.shape[0], attn.heads
    q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return probs.mean(dim=2)


def test_probe_is_the_default_attention_and_masses_sum_to_one(model) -> None:
    unet = model.unet
    x, t, ctx = _inputs(model, ["a baroque painting and a realism painting", ""])
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name: str):  # the layer's inputs (image tokens, text context) on first call
            def hook(module, args, kwargs) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                seen.setdefault(name, (hidden, kwargs["encoder_hidden_states"]))

            return hook

        hooks = [
            m.register_forward_pre_hook(keep(name), with_kwargs=True)
            for name, m in unet.named_modules()
            if getattr(m, "is_cross_attention", False)
        ]
        with CrossAttentionProbe(unet) as probe:
            probe.recording = True
            probed = unet(x, t, encoder_hidden_states=ctx).sample
            masses = probe.take()
        for h in hooks:
            h.remove()
    # Same prediction as diffusers' own processors, which are back afterwards.
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=1e-4)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert set(masses) == set(probe.layers) and len(probe.layers) == 4
    modules = dict(unet.named_modules())
    for layer, mass in masses.items():
        assert mass.shape == (2, probe.heads[layer], MAX_LEN)
        # every head's attention mass sums to one over the tokens
        torch.testing.assert_close(mass.double().sum(-1), torch.ones(2, probe.heads[layer],
                                   dtype=torch.float64), atol=1e-6, rtol=0)  # fmt: skip
        hidden, context = seen[layer]
        want = _masses_float64(modules[layer], hidden, context)
        torch.testing.assert_close(mass.double(), want, atol=2e-6, rtol=1e-4)


def test_head_ablation_changes_exactly_the_ablated_head(model) -> None:
    unet = model.unet
    x, t, ctx = _inputs(model, ["a baroque painting and a realism painting"])
    with torch.no_grad(), CrossAttentionProbe(unet) as probe:
        probe.recording = probe.keep_head_outputs = True
        base_eps = unet(x, t, encoder_hidden_states=ctx).sample
        base, base_mass = probe.take_head_outputs(), probe.take()
        first = probe.layers[0]
        with probe.ablated([(first, 2)]):
            eps = unet(x, t, encoder_hidden_states=ctx).sample
            ablated, mass = probe.take_head_outputs(), probe.take()
        assert probe.head_mask == {}  # restored on leaving the block
        self_attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
        with (
            pytest.raises(KeyError, match="not a cross-attention layer"),
            probe.ablated([(self_attention, 0)]),
        ):
            pass
    out0, out1 = base[first], ablated[first]
    assert out0[:, 2].abs().max() > 0 and torch.equal(out1[:, 2], torch.zeros_like(out1[:, 2]))
    others = [h for h in range(probe.heads[first]) if h != 2]
    assert torch.equal(out1[:, others], out0[:, others])  # the layer's other heads: bit-identical
    assert torch.equal(mass[first], base_mass[first])  # its attention is not touched
    assert not torch.allclose(eps, base_eps)  # the output changes (later layers see it)
    later = probe.layers[1]
    assert not torch.allclose(ablated[later], base[later])


def test_concept_positions_duplicates_and_overlaps(model) -> None:
    tokenizer = model.tokenizer()

    def word_ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    def positions(prompt: ConceptPrompt) -> list[list[int]]:
        return concept_positions(prompt, model.tokenize([prompt.text])[0].tolist(), word_ids)

    plain = positions(
        ConceptPrompt("a baroque painting and a realism painting", ("baroque", "realism"))
    )
    twice = positions(ConceptPrompt("a baroque baroque painting and a realism painting", ("baroque", "realism")))  # fmt: skip
    n = len(word_ids("baroque"))
    assert len(plain[0]) == n and len(twice[0]) == 2 * n
    assert plain[0] == list(range(2, 2 + n))  # after the start token and "a"
    ids = model.tokenize(["a baroque painting"])[0].tolist()
    assert [ids[i] for i in plain[0]] == word_ids("baroque")
    # A concept inside another's words: the longer one claims its tokens first.
    nested = positions(ConceptPrompt("a post realism painting and a realism painting",
                                     ("realism", "post_realism")))  # fmt: skip
    assert len(nested[1]) == len(word_ids("post realism"))
    assert not set(nested[0]) & set(nested[1]) and len(nested[0]) == len(word_ids("realism"))
    with pytest.raises(ValueError, match="has no tokens"):
        positions(ConceptPrompt("a baroque painting and a cubism painting", ("baroque", "realism")))


def test_duplicated_concept_tokens_take_a_larger_share(model) -> None:
    """Writing a concept twice doubles its tokens; its share of the concepts' attention rises
    in every layer (averaged over heads), the DominanceBench token-repetition probe."""
    tokenizer = model.tokenizer()
    prompts = [
        ConceptPrompt("a baroque painting and a realism painting", ("baroque", "realism")),
        ConceptPrompt("a baroque baroque painting and a realism painting", ("baroque", "realism")),
    ]
    ids = model.tokenize([p.text for p in prompts])
    pos = [
        concept_positions(p, row.tolist(), lambda s: tokenizer(s, add_special_tokens=False).input_ids)
        for p, row in zip(prompts, ids)
    ]  # fmt: skip
    x, t, ctx = _inputs(model, [p.text for p in prompts])
    x[1] = x[0]  # the same noise for both
    with torch.no_grad(), CrossAttentionProbe(model.unet) as probe:
        probe.recording = True
        model.unet(x, t, encoder_hidden_states=ctx)
        masses = probe.take()
    for layer, mass in masses.items():
        concept = torch.stack([
            torch.stack([mass[i][:, where].sum(-1) for where in pos[i]], -1) for i in range(2)
        ])  # (prompts, heads, concepts)  # fmt: skip
        share = (concept / concept.sum(-1, keepdim=True)).mean(1)[:, 0]  # baroque's, per prompt
        assert share[1] > share[0] + 0.05, layer


def test_multi_concept_captions_reach_the_unet(model) -> None:
    """(B, K) labels: one caption joining the classes' prompts, encoded as the text encoder
    encodes it alone; (B,) labels keep the class path."""
    null = model.null_label
    rows = torch.tensor([[1, 2], [null, null], [0, null]])
    assert model.caption([1, 2]) == "a baroque painting and a realism painting"
    assert model.caption([0, null]) == "a art nouveau painting"
    embeds = model.unet_condition(rows)["encoder_hidden_states"]
    want = model.encode_prompts([model.caption([1, 2]), model.caption([0, null])])
    torch.testing.assert_close(embeds[0], want[0])
    torch.testing.assert_close(embeds[2], want[1])
    torch.testing.assert_close(embeds[1], model.prompt_embeds[null])
    torch.testing.assert_close(
        model.unet_condition(torch.tensor([2, null]))["encoder_hidden_states"],
        model.prompt_embeds[[2, null]],
    )
    with pytest.raises(ValueError, match="not classes"):
        model.caption([0, 7])


def test_lora_scale_zero_is_the_pretrained_model(model) -> None:
    x, t, ctx = _inputs(model, ["a baroque painting and a realism painting"])
    with torch.no_grad():
        plain = model.unet(x, t, encoder_hidden_states=ctx).sample
        factors = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
        for p in factors:
            p.normal_(0, 0.2)
        tuned = model.unet(x, t, encoder_hidden_states=ctx).sample
        with lora_scaled(model, 0.0):
            before = model.unet(x, t, encoder_hidden_states=ctx).sample
        again = model.unet(x, t, encoder_hidden_states=ctx).sample
        for p in factors:
            p.zero_()
    assert not torch.allclose(tuned, plain, atol=1e-4)
    torch.testing.assert_close(before, plain)
    torch.testing.assert_close(again, tuned)


def test_saturation_step() -> None:
    assert saturation([0.5, 0.5, 0.5], 0.9) == 0  # never rises
    assert saturation([0.5, 0.8, 0.9, 0.91, 0.95], 0.9) == 3  # 0.5 + 0.9 * 0.45 = 0.905
    assert saturation([0.6, 0.5, 0.7], 1.0) == 2


def _analysed(model: StableDiffusionBackbone, tmp_path: Path):
    """The model as a loaded run (what ltd-analyze gives compute), on CPU."""
    from lt_diffusion.analysis.common import AnalysedRun
    from lt_diffusion.runs.load import LoadedRun

    cfg = compose_config(
        "train",
        ["model=sd_lora", f"model.pretrained={model.pretrained}", f"paths.run_dir={tmp_path}"],
    )
    info = {"name": "artbench10", "num_classes": 3, "class_names": NAMES,
            "class_counts": [50, 10, 5], "splits": ["many", "medium", "few"]}  # fmt: skip
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "checkpoint": str(tmp_path / "x.ckpt"),
            "global_step": 0, "dataset": info}  # fmt: skip
    return AnalysedRun(LoadedRun(model, meta, torch.device("cpu")), None, info)


def test_analysis_record_validates(model, tmp_path: Path) -> None:
    from lt_diffusion.analysis.common import build_analysis_record
    from lt_diffusion.analysis.concept_dominance import plot

    prompt_set = tmp_path / "pairs.yaml"
    prompt_set.write_text(
        'template: "a {} painting and a {} painting"\npairs: [[baroque, realism], [realism, '
        "baroque], [art_nouveau, realism]]\nprompts:\n  - {text: a baroque baroque painting and "
        "a realism painting, concepts: [baroque, realism]}\n"
    )
    settings = ConceptDominanceSettings(
        prompt_set=str(prompt_set), images_per_prompt=2, steps=3, ablation_prompts=1,
        ablation_steps=2, group_sizes=(2,),
    )  # fmt: skip
    run = _analysed(model, tmp_path)
    results = compute(run, settings, batch_size=16, show_progress=False)
    record = validate(build_analysis_record("concept_dominance", settings, run, results, "test"))
    json.dumps(record, allow_nan=False)
    res = record["results"]
    assert len(res["prompts"]) == 4 and res["timesteps"][0] > res["timesteps"][-1]
    assert res["token_mass_sum_max_error"] < 1e-5
    for p in res["prompts"]:
        assert len(p["share_by_step"]) == 3 and len(p["image_share"]) == 2
        assert all(abs(sum(row) - 1) < 1e-9 for row in p["share_by_step"])
    plain, twice = res["prompts"][0], res["prompts"][3]
    assert twice["image_share"][0][0] > plain["image_share"][0][0]  # "baroque" written twice
    # The per-concept win rates follow from the image shares (recomputed here).
    wins: dict[str, list[float]] = {}
    for p in res["prompts"]:
        for a, b in p["image_share"]:
            w = 1.0 if a > b else 0.5 if a == b else 0.0
            wins.setdefault(p["concepts"][0], []).append(w)
            wins.setdefault(p["concepts"][1], []).append(1 - w)
    for entry in res["per_concept"]:
        want = wins[entry["concept"]]
        assert entry["win_rate"]["attention"] == pytest.approx(sum(want) / len(want))
        assert entry["count"] == dict(zip(NAMES, [50, 10, 5]))[entry["concept"]]
    ab = res["ablation"]
    assert len(ab["single_heads"]) == sum(res["heads"]) and len(ab["groups"]) == 2
    assert res["clip"]["folder"] is None and CLIP_ENV in res["clip"]["unavailable"]
    assert plot(record, tmp_path / "p.png").is_file()

    broken = json.loads(json.dumps(record))
    broken["results"]["prompts"][0]["share_by_step"][0] = [0.7, 0.7]
    with pytest.raises(ValueError, match="summing to one"):
        validate(broken)
    broken = json.loads(json.dumps(record))
    broken["results"]["ablation"]["groups"][0]["heads"].pop()
    with pytest.raises(ValueError, match="lists 1 heads"):
        validate(broken)
    broken = json.loads(json.dumps(record))
    broken["results"]["frequent_dominates"]["attention"] = 1.5
    with pytest.raises(ValueError, match="less than or equal to 1"):
        validate(broken)


def test_bad_settings_and_prompt_sets_say_what_to_change(model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="analysis.prompt_set='nowhere'"):
        ConceptDominanceSettings(prompt_set="nowhere")
    with pytest.raises(ValueError, match="analysis.saturation"):
        ConceptDominanceSettings(saturation=0.0)
    with pytest.raises(FileNotFoundError, match=r"analysis.clip=.*does not exist"):
        ConceptDominanceSettings(clip=str(tmp_path / "no-clip"))
    bad = tmp_path / "bad.yaml"
    bad.write_text('template: "a {} painting and a {} painting"\npairs: [[baroque, cubism]]\n')
    from lt_diffusion.analysis.prompts import read_prompt_set

    with pytest.raises(ValueError, match=r"\['cubism'\], which are not classes"):
        build_prompts(read_prompt_set(str(bad)), NAMES)
    assert len(build_prompts(read_prompt_set("artbench10_style_pairs"), NAMES)) == 6  # 3 * 2


@pytest.mark.skipif(not os.environ.get(CLIP_ENV), reason=f"no CLIP model staged (${CLIP_ENV})")
def test_staged_clip_scores_match_its_own_logits() -> None:
    """With the user's CLIP model: the scorer's cosine similarities are CLIP's own
    ``logits_per_image`` divided by its logit scale."""
    scorer = ClipScorer(clip_folder(None))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    texts = ["a baroque painting", "a realism painting"]
    sim = scorer.similarity(images, texts)
    inputs = scorer.processor(text=texts, images=[i.permute(1, 2, 0).numpy() for i in images],
                              return_tensors="pt", padding=True)  # fmt: skip
    with torch.no_grad():
        out = scorer.model(**inputs)
    want = (out.logits_per_image / scorer.model.logit_scale.exp()).double()
    torch.testing.assert_close(sim, want, atol=1e-4, rtol=1e-4)


# -- IMBA on multi-concept captions ---------------------------------------------------------


def test_concept_collage_cuts_strips_and_lists_their_classes() -> None:
    from lt_diffusion.methods.imba import concept_collage

    x0 = torch.arange(3 * 2 * 2 * 5, dtype=torch.float32).view(3, 2, 2, 5)
    y = torch.tensor([7, 8, 9])
    out, labels = concept_collage(x0, y, 2)
    assert labels.tolist() == [[7, 8], [8, 9], [9, 7]]
    for b in range(3):
        assert torch.equal(out[b, ..., :2], x0[b, ..., :2])
        assert torch.equal(out[b, ..., 2:], x0[(b + 1) % 3, ..., 2:])  # the last takes the rest
    with pytest.raises(ValueError, match="concepts_per_caption=4 .* raise data.batch_size"):
        concept_collage(x0, y, 4)


def test_imba_on_captions_is_the_papers_loss_on_the_caption_embeddings(model) -> None:
    """The loss of method=imba_captions recomputed in float64 from its definition, with the
    captions encoded as text directly (not through the labels) and fed to the U-Net."""
    from lt_diffusion.diffusion import NoiseSchedule
    from lt_diffusion.methods import IMBAObjective
    from lt_diffusion.methods.imba import concept_collage

    schedule = NoiseSchedule(**SCHEDULE)
    objective = IMBAObjective(gamma=0.8, lam=0.9, concepts_per_caption=2, fused_forward=False)
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([0, 2, 1])
    torch.manual_seed(5)
    out = objective(model, x0, y, schedule)
    assert {"imba_cond", "imba_uncond", "imba_dist"} <= set(out.terms)

    torch.manual_seed(5)
    xc, yc = concept_collage(x0, y, 2)
    draw = objective.noised(xc, schedule)  # the same draws as the objective's
    names = [n.replace("_", " ") for n in NAMES]
    captions = [f"a {names[a]} painting and a {names[b]} painting" for a, b in yc.tolist()]
    assert captions[0] == "a art nouveau painting and a realism painting"
    with torch.no_grad():
        ctx = model.encode_prompts(captions)
        eps_c = model.unet(draw.x_t, draw.t, encoder_hidden_states=ctx).sample.double()
        empty = model.encode_prompts([""] * 3)
        eps_u = model.unet(draw.x_t, draw.t, encoder_hidden_states=empty).sample.double()
    noise = draw.noise.double()
    dist = (noise - eps_u).abs().pow(0.8).mean(1)  # (B, h, w): one weight per latent position
    cond = (dist * (eps_c - noise).pow(2).mean(1)).mean()
    want = 0.9 * cond + 0.1 * (eps_u - noise).pow(2).mean()
    assert float(out.loss) == pytest.approx(float(want), rel=1e-4)


def test_captions_need_a_text_to_image_backbone() -> None:
    from lt_diffusion.diffusion import NoiseSchedule
    from lt_diffusion.methods import IMBAObjective
    from lt_diffusion.models import UNet

    unet = UNet(image_size=8, in_channels=3, ch=32, ch_mult=(1,), attn_resolutions=(),
                num_res_blocks=1, num_classes=3)  # fmt: skip
    objective = IMBAObjective(concepts_per_caption=2)
    with pytest.raises(ValueError, match="needs a text-to-image backbone .* set it to 1"):
        objective(unet, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), NoiseSchedule(**SCHEDULE))
    with pytest.raises(ValueError, match="concepts_per_caption must be >= 1"):
        IMBAObjective(concepts_per_caption=0)


@pytest.mark.slow
def test_command_on_a_fine_tuned_run_before_and_after(sd_folder: Path, tmp_path: Path) -> None:
    """ltd-analyze on a checkpoint of the IMBA-on-captions row (two training steps on a tiny
    ArtBench-10): the pretrained model (lora_scale 0) and the fine-tuned one, into two records."""
    from lt_diffusion import analyze, train
    from tests.fakedata import write_artbench10

    write_artbench10(tmp_path / "data" / "artbench10", n_per_class=100, test_per_class=1)
    run_dir = tmp_path / "run"
    cfg = compose_config("train", [
        "experiment=dominance/artbench10_ir100_imba_captions", "trainer=cpu", "logger=none",
        f"paths.data_root={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}",
        f"paths.run_dir={run_dir}", f"model.pretrained={sd_folder}", "diffusion=linear",
        "model.lora.rank=4", "model.lora.alpha=4", "model.latent_cache_dir=null",
        "model.gradient_checkpointing=false", "dataset.image_size=32", "data.batch_size=4",
        "train.max_steps=2", "train.warmup_steps=1", "train.ckpt_every=2", "train.grid_every=0",
        "train.log_every=1",
    ])  # fmt: skip
    train.run(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text('template: "a {} painting and a {} painting"\npairs: [[baroque, realism]]\n')
    records = {}
    for scale in (0.0, 1.0):
        out = tmp_path / f"scale{scale}.json"
        records[scale] = analyze.run(compose_config("analyze", [
            "analysis=concept_dominance", f"checkpoint={ckpt}", "device=cpu", "progress=false",
            f"analysis.prompt_set={pairs}", "analysis.images_per_prompt=2", "analysis.steps=2",
            "analysis.ablation_prompts=1", "analysis.ablation_steps=1", "analysis.group_sizes=[2]",
            f"analysis.lora_scale={scale}", f"record={out}",
        ]))  # fmt: skip
        saved = validate(json.loads(out.read_text()))
        assert saved["settings"]["lora_scale"] == scale and out.with_suffix(".png").is_file()
        assert saved["dataset"]["class_names"][1] == "baroque"
    before = records[0.0]["results"]["prompts"][0]["share_by_step"]
    after = records[1.0]["results"]["prompts"][0]["share_by_step"]
    assert before != after  # the two trained LoRA steps moved the attention
