"""The IMBA paper's experiments as tables: the published numbers in the specs against the paper's
text, every run in a directory of its own, the concept image source's counts and refusals, the
judges of the prompt-composition analysis (a staged VQA model, CLIP) and their refusals, and
(slow) every table as one command from an empty output folder on a tiny Stable Diffusion and on
the synthetic data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_diffusion.tables import load_table_by_name
from tests.conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")
PAPER = ROOT.parent / "shared" / "papers" / "imba_loss_iccv2025.txt"
SD_TABLES = ["imba_causal", "imba_granularity", "imba_balancing", "imba_gamma"]
PAIR_TABLES = ["imba_pairs_causal", "imba_pairs_size", "imba_pairs_methods", "imba_pairs_gamma"]
ALL = [*SD_TABLES, *PAIR_TABLES, "imba_distance_check"]


def _paper() -> str:
    if not PAPER.is_file():
        pytest.skip(f"the paper's text is not at {PAPER} (outside the repository)")
    return PAPER.read_text()


def _k(text: str) -> float:
    """``3K`` -> 3000, ``0.03K`` -> 30."""
    return float(text.rstrip("K")) * 1000


def test_causal_numbers_are_the_papers() -> None:
    """Each row of imba_causal is the paper's row with the same pair, head / tail counts and
    ratio: its success rate (%) and CLIP score."""
    rows = re.findall(
        r"^(piano-submarine|volcano-twins) \([a-z ]+\) (\S+K) (\S+K) (\d+):(\d+) (\d+)% (0\.\d+)$",
        _paper(), re.MULTILINE,
    )  # fmt: skip
    assert len(rows) == 6
    spec = load_table_by_name("imba_causal")
    got = {}
    for block in spec.blocks:
        for row in block.rows:
            head, tail, ratio = re.match(r"(\S+K) / (\S+K) \((\d+):1\)", row.label).groups()
            got[(block.label, _k(head), _k(tail), int(ratio))] = row.published
    for pair, head, tail, r_head, r_tail, success, clip in rows:
        assert int(r_tail) == 1 and _k(head) / _k(tail) == pytest.approx(int(r_head))
        published = got.pop((pair, _k(head), _k(tail), int(r_head)))
        assert published == {"vqa": int(success) / 100, "clip_success": None, "clip": float(clip)}
    assert not got  # every row of the spec is a row of the paper


@pytest.mark.parametrize(
    "table,heading",
    [("imba_granularity", "Comparison of Loss Weighting Granularity"),
     ("imba_balancing", "Comparison of Balancing Methods")],
)  # fmt: skip
def test_ablation_numbers_are_the_papers(table: str, heading: str) -> None:
    text = _paper().split(heading, 1)[1]
    names = next(line for line in text.splitlines() if line.strip())  # "Method Baseline ..."
    success = [
        float(v) / 100 for v in re.search(r"Success Rate ([\d.% ]+)", text)[1].split("%")[:-1]
    ]
    clip = [float(v) for v in re.search(r"CLIP Score ([\d. ]+)", text)[1].split()]
    rows = load_table_by_name(table).blocks[0].rows
    assert len(rows) == len(success) == len(clip) == 3
    for row, s, c in zip(rows, success, clip):
        assert row.published == {"vqa": pytest.approx(s), "clip_success": None, "clip": c}
        assert row.label.split(" ")[0].split("-")[0] in names  # Baseline, Sample, Token, ...


def test_gamma_study_says_what_the_paper_says() -> None:
    text = _paper()
    assert r"\(\gamma = 0.8\) achieves the best balance" in text
    assert "gamma -> 2 induces severe color shift" in text.replace(
        r"\(\gamma \to 2\)", "gamma -> 2"
    )
    spec = load_table_by_name("imba_gamma")
    labels = [r.label for r in spec.blocks[0].rows]
    assert labels[0].startswith("gamma 0 ") and "gamma 0.8 (paper)" in labels
    assert labels[-1] == "gamma 2.0"
    assert all(v is None for r in spec.blocks[0].rows for v in r.published.values())


def test_size_rows_state_the_parameters_of_the_model_they_build() -> None:
    """Each row of imba_pairs_size says its width and the parameter count (in millions, as
    rounded in the label) of the concept-pair model its run builds."""
    from hydra.utils import instantiate

    spec = load_table_by_name("imba_pairs_size")
    widths = []
    for row in spec.blocks[0].rows:
        width, millions = re.fullmatch(r"width (\d+) \(([\d.]+)M\)", row.label).groups()
        run = spec.run_ref(row.experiments["tail"], 0, row.overrides)
        cfg = compose_config("train", run.train_overrides())
        assert int(cfg.model.ch) == int(width)
        params = sum(p.numel() for p in instantiate(cfg.model).parameters())
        digits = len(millions.split(".")[1])
        assert round(params / 1e6, digits) == float(millions), (row.label, params)
        widths.append(int(width))
    assert widths == [32, 64, 128, 256] and spec.blocks[0].baseline == "width 64 (0.11M)"


def test_every_run_of_the_tables_has_its_own_directory() -> None:
    """Rows of one experiment differ by their overrides: each must name its own run (scale,
    ratio and concepts in the dataset's name, width and gamma in the tag), or two rows would
    share (and resume) one run; across the tables too, where a shared run is the same run."""
    runs = set()
    for name in ALL:
        spec = load_table_by_name(name)
        spec.seeds = [0]  # the seed is in every run name
        runs |= set(spec.runs())
    names = Counter(str(compose_config(r.task, r.train_overrides()).run_name) for r in runs)
    assert len(names) == len(runs) == 32, [n for n, k in names.items() if k > 1]


# ----------------------------------------------------------------------------------------------
# The concept image source


def test_concept_images_keep_the_profiles_counts_and_refuse_too_few(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from lt_diffusion.data.concept_images import ConceptImageSource
    from tests.fakedata import write_concept_images

    root = tmp_path / "data" / "concept_images"
    write_concept_images(root, {"piano": 300, "submarine": 5}, hw=(8, 8))
    cfg = compose_config("train", [
        "experiment=imba/sd_plain", f"paths.data_root={tmp_path / 'data'}",
        "dataset.image_size=8", "dataset.source.n_per_class=300",
    ])  # fmt: skip
    dm = instantiate(cfg.data, sampler="uniform", on_device=False)
    dm.setup()
    assert dm.class_names == ["piano", "submarine"] and dm.class_counts == [300, 3]
    assert torch.bincount(dm.train_labels).tolist() == [300, 3]
    assert dm.train_images.shape[1:] == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"submarine holds 5, needs 30.*stage them"):
        ConceptImageSource(root, 8, ["piano", "submarine"], 3000, "step", 100)  # 3K / 0.03K
    with pytest.raises(ValueError, match="'submarine' without an image .* at least 100"):
        ConceptImageSource(root, 8, ["piano", "submarine"], 50, "step", 100)
    assert ConceptImageSource(root, 8, ["piano", "submarine"], 5, "exp", 1).counts == [5, 5]


# ----------------------------------------------------------------------------------------------
# The judges: a staged VQA model and CLIP


@pytest.fixture(scope="module")
def vqa_yes(tmp_path_factory) -> Path:
    from tests.fakedata import write_tiny_vqa

    return write_tiny_vqa(tmp_path_factory.mktemp("vqa") / "yes", answer="yes")


def test_vqa_presence_is_the_models_own_answer(vqa_yes: Path, tmp_path: Path) -> None:
    """The scorer's answers are BLIP's greedy answers decoded (asked directly here), and a
    concept is present exactly when the answer starts with yes."""
    from transformers import BlipForQuestionAnswering, BlipProcessor

    from lt_diffusion.analysis.vqa_score import VqaScorer
    from tests.fakedata import write_tiny_vqa

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    for folder, want in ((vqa_yes, True), (write_tiny_vqa(tmp_path / "no", answer="no"), False)):
        scorer = VqaScorer(folder)
        present, answers = scorer.present(images, ["piano", "golden_retriever"])
        assert present.shape == (3, 2) and bool((present == want).all())
        model = BlipForQuestionAnswering.from_pretrained(folder).eval()
        proc = BlipProcessor.from_pretrained(folder)
        inputs = proc(
            images=[im.permute(1, 2, 0).numpy() for im in images],
            text=["is there a golden retriever in the image?"] * 3,
            return_tensors="pt",
        )
        with torch.no_grad():
            direct = proc.batch_decode(model.generate(**inputs, max_new_tokens=3),
                                       skip_special_tokens=True)  # fmt: skip
        assert [row[1] for row in answers] == [a.strip().lower() for a in direct]


def test_a_required_judge_that_is_not_staged_is_refused_before_any_work(
    monkeypatch, tmp_path: Path
) -> None:
    from lt_diffusion import analyze
    from lt_diffusion.analysis.prompt_composition import PromptCompositionSettings

    monkeypatch.delenv("LT_DIFFUSION_VQA", raising=False)
    monkeypatch.delenv("LT_DIFFUSION_CLIP", raising=False)
    assert PromptCompositionSettings().require == ()  # by default: the record says why instead
    cfg = compose_config("analyze", [
        "analysis=prompt_composition", "analysis.require=[vqa]",
        f"checkpoint={tmp_path / 'none.ckpt'}",  # never read: the settings fail first
    ])  # fmt: skip
    with pytest.raises(
        FileNotFoundError, match=r"require lists vqa, but no VQA model is staged"
    ) as e:
        analyze.run(cfg)
    assert "BlipForQuestionAnswering" in str(e.value) and "save_pretrained" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"analysis.vqa=.*missing does not exist"):
        PromptCompositionSettings(vqa=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="subset of"):
        PromptCompositionSettings(require=("human",))
    # A table whose cells require the VQA judge: refused when the table command resolves its
    # runs, before any run is launched (nothing written under the output folder).
    from omegaconf import OmegaConf

    from lt_diffusion.tables import TableSpecError, load_table, resolve

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "table" / "imba_causal.yaml"))
    row = {**raw["blocks"][0]["rows"][0], "analysis": {"require": "[vqa]"}}  # an override
    raw.update(seeds=[0], blocks=[{**raw["blocks"][0], "rows": [row]}])
    with pytest.raises(TableSpecError, match=r"require lists vqa, but no VQA model is staged") as e:
        resolve(load_table(raw), [f"paths.output_dir={tmp_path / 'out'}"])
    assert "save_pretrained" in str(e.value) and not (tmp_path / "out").exists()


def test_mean_colour_and_record_checks() -> None:
    from lt_diffusion.analysis.prompt_composition import mean_colour, validate

    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    want = images.numpy().astype(np.float64).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean_colour(images, batch=2).numpy(), want, rtol=1e-12)
    record = {"analysis": "prompt_composition", "results": {
        "clip": {"unavailable": "no CLIP", "success": 0.5}, "vqa": {"success": None},
        "colour_shift": 1.0}}  # fmt: skip
    with pytest.raises(ValueError, match="clip is unavailable but has a success rate"):
        validate(record)


# ----------------------------------------------------------------------------------------------
# Every table as one command (slow)


def _table(out: Path, table: str, *args: str, env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "lt_diffusion.table", f"table={table}",
           f"paths.output_dir={out}", *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, **(env or {})})  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _shrunk(name: str, configs: Path, scale: int = 10) -> str:
    """A copy of table ``name`` as ``<name>_tiny`` under ``configs/table/`` (add ``configs`` to
    Hydra's search path): one seed, every row's data scale (``dataset.source.n_per_class``,
    the dataset config's default where a row sets none) divided by ``scale``, its analysis at
    two images per prompt and three sampler steps."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "table" / f"{name}.yaml"))
    default = compose_config("train", [f"experiment={spec['blocks'][0]['rows'][0]['experiment']}"])
    n0 = int(default.dataset.source.n_per_class)
    for block in spec["blocks"]:
        for row in block["rows"]:
            over = [o for o in row.get("overrides", []) if "n_per_class" not in o]
            n = next((int(o.split("=")[1]) for o in row.get("overrides", [])
                      if "n_per_class" in o), n0)  # fmt: skip
            row["overrides"] = [*over, f"dataset.source.n_per_class={n // scale}"]
            row["analysis"] = {**row.get("analysis", {}), "images_per_prompt": 2, "steps": 3}
    spec.update(name=f"{name}_tiny", seeds=[0])
    (configs / "table").mkdir(parents=True, exist_ok=True)
    (configs / "table" / f"{name}_tiny.yaml").write_text(json.dumps(spec))
    return f"{name}_tiny"


@pytest.mark.slow
def test_stable_diffusion_tables_are_one_command_each(tmp_path: Path) -> None:
    """The four SD tables from an empty output folder on a tiny Stable Diffusion, with the
    paper's concepts staged at a tenth of its scales and tiny CLIP and VQA judges: every cell
    has a number (success by both judges, CLIP score, colour shift), beside the paper's."""
    from tests import fakedata

    sd = fakedata.write_tiny_sd(tmp_path / "sd", schedule="scaled_linear", max_length=48)
    judges = {
        "LT_DIFFUSION_CLIP": str(fakedata.write_tiny_clip(tmp_path / "clip")),
        "LT_DIFFUSION_VQA": str(fakedata.write_tiny_vqa(tmp_path / "vqa", answer="yes")),
    }
    fakedata.write_concept_images(tmp_path / "data" / "concept_images",
                                  {"piano": 1500, "submarine": 15, "volcano": 500, "twins": 50},
                                  hw=(32, 32))  # fmt: skip
    train = [
        f"model.pretrained={sd}", "model.lora.rank=4", "model.lora.alpha=4",
        "model.latent_cache_dir=null", "model.gradient_checkpointing=false",
        "dataset.image_size=32", "trainer=cpu", "logger=none", "data.batch_size=4",
        "train.max_steps=2", "train.warmup_steps=1", "train.ckpt_every=2", "train.grid_every=0",
        "train.grid_per_class=1", "train.grid_steps=2", "train.threads=1",
        f"paths.data_root={tmp_path / 'data'}",
    ]  # fmt: skip
    out, configs = tmp_path / "out", tmp_path / "configs"
    for table in SD_TABLES:
        name = _shrunk(table, configs)
        _table(out, name, f"hydra.searchpath=[file://{configs}]", "workers=2",
               f"train_overrides=[{','.join(json.dumps(o) for o in train)}]", env=judges)  # fmt: skip
        rows = list(csv_rows(out / "tables" / f"{name}.csv"))
        assert rows and all(r["status"] == "ok" for r in rows), rows
    causal = {(r["row"], r["column"]): r for r in csv_rows(out / "tables" / "imba_causal_tiny.csv")}
    assert float(causal[("3K / 0.03K (100:1)", "vqa")]["published"]) == 0.16
    assert float(causal[("3K / 0.03K (100:1)", "vqa")]["mean"]) == 1.0  # the judge says yes


@pytest.mark.slow
def test_synthetic_tables_are_one_command_each(tmp_path: Path) -> None:
    """The four synthetic tables from an empty output folder (one seed, 30 training steps):
    every cell has a number, and runs shared between tables are trained once."""
    out = tmp_path / "out"
    train = ["train.max_steps=30", "train.warmup_steps=5", "train.ckpt_every=30"]
    first = ""
    for table in PAIR_TABLES:
        first += _table(out, table, "table.seeds=[0]", "workers=2",
                        f"train_overrides=[{','.join(json.dumps(o) for o in train)}]")  # fmt: skip
        rows = list(csv_rows(out / "tables" / f"{table}.csv"))
        assert rows and all(r["status"] == "ok" for r in rows), rows
    assert "imba_pairs_methods: 4 runs, 1 done, 3 to run" in first  # the standard loss's run
    assert "imba_pairs_gamma: 6 runs, 2 done, 4 to run" in first


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)
