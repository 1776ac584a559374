"""Records: schema validation, atomic writes that never damage an old record, round trips;
the atomic-write helpers; the FID-vs-count plot."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from lt_diffusion.evaluation.plots import plot_fid_vs_count
from lt_diffusion.evaluation.record import conventions
from lt_diffusion.records.base import (
    SCHEMA_VERSION,
    RecordError,
    build_record,
    class_index,
    read_record,
    validate,
    write_record,
)
from lt_diffusion.runtime import code_version
from lt_diffusion.utils.io import (
    atomic_open,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
)


def _entry(fid: float, n_gen: int = 100, n_real: int = 200) -> dict:
    return {
        "n_generated": n_gen, "n_real": n_real, "fid": fid, "kid": 0.01, "kid_std": 0.001,
        "kid_subset_size": 50, "kid_subsets": 20, "precision": 0.7, "recall": 0.4, "pr_k": 5,
        "is": None, "is_unavailable": "no logits layer",
    }  # fmt: skip


def make_record(per_class: bool = True) -> dict:
    counts = [500, 300, 180, 108, 64, 39, 23, 14, 8, 5]
    splits = ["many"] * 3 + ["medium"] * 3 + ["few"] * 4
    metrics = {
        "overall": _entry(30.5),
        "per_split": {s: _entry(f) for s, f in (("many", 25.0), ("medium", 40.0), ("few", 70.0))},
        "per_class": {f"class_{c:03d}": _entry(20.0 + 10 * c, 10, 20) for c in range(10)}
        if per_class
        else {},
    }
    return build_record(
        config={"dataset": {"name": "cifar10_lt"}, "seed": 0},
        dataset={
            "name": "cifar10_lt",
            "class_counts": counts,
            "splits": splits,
            "class_names": [f"c{c}" for c in range(10)],
        },  # fmt: skip
        checkpoint={"path": "runs/x/checkpoints/last.ckpt", "step": 1000},
        sampler={"name": "ddim50", "steps": 50, "guidance": 0.0},
        protocol={"name": "quick", "pr_k": 5},
        extractors={"inception": {"name": "inception-v3-compat", "weights_sha256": "0" * 64}},
        reference={"origin": "dataset", "split": "train", "description": "the training split"},
        conventions=conventions(0.0),
        metrics=metrics,
        identity={"digest": "0123abcd", "train": "t", "protocol": "p", "generation": "g"},
        code_version="v0-test",
        seconds={"total": 1.0},
    )


def test_record_round_trips(tmp_path: Path) -> None:
    record = make_record()
    path = write_record(tmp_path / "records" / "r.json", record)
    assert read_record(path) == record
    assert record["schema"] == SCHEMA_VERSION and record["seconds"] == {"total": 1.0}
    assert json.loads(path.read_text())["metrics"]["overall"]["is"] is None


def test_failed_serialisation_leaves_the_old_record_intact(tmp_path: Path) -> None:
    path = write_record(tmp_path / "r.json", make_record())
    before = path.read_bytes()
    bad = make_record()
    bad["config"]["callback"] = object()  # not JSON
    with pytest.raises(RecordError, match="cannot be written as JSON"):
        write_record(path, bad)
    nan = make_record()
    nan["metrics"]["overall"]["fid"] = float("nan")
    with pytest.raises(RecordError, match="finite number"):
        write_record(path, nan)
    nan_extra = make_record()
    nan_extra["seconds"] = {"total": float("inf")}  # not validated, but strict JSON refuses it
    with pytest.raises(RecordError, match="JSON"):
        write_record(path, nan_extra)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp files left


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda r: r.pop("reference"), "reference: Field required"),
        (lambda r: r.pop("conventions"), "conventions: Field required"),
        (lambda r: r["extractors"]["inception"].pop("weights_sha256"), "lack their name or"),
        (lambda r: r["metrics"]["overall"].update(primary="fid2"), "primary names 'fid2'"),
        (lambda r: r["metrics"]["overall"].pop("is_unavailable"), "without is_unavailable"),
        (lambda r: r["metrics"]["overall"].pop("kid_subset_size"), "kid_subset_size"),
        (lambda r: r["metrics"]["per_split"]["few"].pop("pr_k"), "without the \\['pr_k'\\]"),
        (lambda r: r["metrics"]["per_split"].update(tail=_entry(1.0)), "per_split.tail"),
        (
            lambda r: r["metrics"]["per_class"].update(class_012=_entry(1.0)),
            "the dataset lacks: \\['class_012'\\]",
        ),
        (lambda r: r["metrics"]["per_class"].update(cat=_entry(1.0)), "cat.*should match pattern"),
        (lambda r: r["dataset"]["splits"].pop(), "one split per class"),
        (lambda r: r["sampler"].pop("guidance"), "guidance"),
        (lambda r: r["checkpoint"].pop("step"), "checkpoint.step: Field required"),
        (
            lambda r: r["metrics"]["overall"].update(n_real=-1),
            "n_real: Input should be greater than or equal to 0",
        ),
        (lambda r: r.update(schema=99), "schema 99"),
    ],
)
def test_validation_says_what_is_wrong(tmp_path: Path, edit, message: str) -> None:
    record = copy.deepcopy(make_record())
    edit(record)
    with pytest.raises(RecordError, match=message):
        validate(record)
    # a record edited by hand on disk is refused when read
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    with pytest.raises(RecordError, match=message):
        read_record(path)


def test_unreadable_records_are_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"schema": 1, "metr')
    with pytest.raises(RecordError, match="not a readable record"):
        read_record(path)
    with pytest.raises(RecordError, match="not a readable record"):
        read_record(tmp_path / "missing.json")


def test_class_keys_and_code_version() -> None:
    assert class_index("class_007") == 7 and class_index("12") == 12 and class_index(3) == 3
    assert code_version()


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_open_replaces_only_on_success(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a" / "f.txt", "old")
    with pytest.raises(RuntimeError), atomic_open(path, "wb") as f:
        f.write(b"half of the new cont")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": {1, 2}})  # serialisation fails before the file is touched
    assert path.read_text() == "old"


def test_atomic_files_get_normal_permissions(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; records and caches must stay readable by the group.
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "new.txt", "x")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        atomic_write_text(path, "y")
        assert path.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    finally:
        os.umask(mask)


def test_atomic_torch_save_round_trips(tmp_path: Path) -> None:
    obj = {"w": torch.arange(5.0), "step": 3}
    path = atomic_torch_save(obj, tmp_path / "c.pt")
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], obj["w"])


# ---------------------------------------------------------------------------- plot


def test_plot_fid_vs_count_per_class_then_per_split(tmp_path: Path) -> None:
    path = plot_fid_vs_count(make_record(), tmp_path / "plots" / "fid.png")
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300 and np.ptp(img) > 0
    fallback = plot_fid_vs_count(make_record(per_class=False), tmp_path / "split.png")
    assert fallback.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fallback.read_bytes() != path.read_bytes()
    no_fid = make_record(per_class=False)
    for entry in [no_fid["metrics"]["overall"], *no_fid["metrics"]["per_split"].values()]:
        entry.pop("fid")
    assert plot_fid_vs_count(no_fid, tmp_path / "none.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "split.png"]


def test_the_documented_json_schema_is_the_records() -> None:
    """docs/record.schema.json is what the model says (regenerate with
    ``python -m lt_diffusion.evaluation.record > docs/record.schema.json``)."""
    from lt_diffusion.evaluation.record import json_schema
    from tests.conftest import ROOT

    assert json.loads((ROOT / "docs" / "record.schema.json").read_text()) == json_schema()


# ---------------------------------------------------------------------------- schema 3


def _as_schema_2(record: dict) -> dict:
    """The record as schema 2 wrote it: one ``extractor``, no reference or conventions."""
    old = copy.deepcopy(record)
    old["schema"] = 2
    del old["reference"], old["conventions"]
    old["extractor"] = {**old.pop("extractors")["inception"], "has_logits": False}
    return old


def test_schema_2_records_stay_readable(tmp_path: Path) -> None:
    from lt_diffusion import tables  # noqa: F401  (the kinds a table reads)

    new = make_record()
    path = tmp_path / "old.json"
    path.write_text(json.dumps(_as_schema_2(new)))
    with pytest.raises(RecordError, match="schema 2.*read it with read_record"):
        validate(json.loads(path.read_text()))
    for read in (read_record,):  # the one reader of every kind
        old = read(path)
        assert old["schema"] == 3 and old["upgraded_from"] == 2
        assert old["metrics"] == new["metrics"] and old["identity"] == new["identity"]
        assert old["extractors"]["inception"]["weights_sha256"] == "0" * 64
        assert (
            old["reference"]["origin"] == "dataset"
            and "schema 2" in old["reference"]["description"]
        )
        assert old["conventions"] == conventions(0.0)
    # The synthetic benchmark's records named no extractor; an LPIPS part moves beside it.
    toy = _as_schema_2(new)
    toy["extractor"] = {
        "name": "none (exact metrics)",
        "weights_sha256": "none",
        "lpips": {"net": "alex"},
    }
    path.write_text(json.dumps(toy))
    assert read_record(path)["extractors"] == {"lpips": {"net": "alex"}}


def test_the_guidance_convention_is_diffusers_scale_w_plus_one() -> None:
    """What the record states: eps_c + w (eps_c - eps_u) (guided_eps) is diffusers'
    eps_u + s (eps_c - eps_u) at s = w + 1."""
    from lt_diffusion.diffusion import guided_eps

    class Net(torch.nn.Module):
        null_label = 3

        def forward(self, x, t, y):
            return x * (y.float() + 1)[:, None] + t.float()[:, None] / 10

    x, t, y = torch.randn(4, 2, dtype=torch.float64), torch.arange(4), torch.tensor([0, 1, 2, 0])
    eps_c, eps_u = Net()(x, t, y), Net()(x, t, torch.full_like(y, 3))
    for w in (0.0, 1.5, 4.0):
        stated = conventions(w)["guidance"]
        s = stated["diffusers_guidance_scale"]
        assert s == w + 1 and stated["formula"] == "eps_c + w (eps_c - eps_u)"
        torch.testing.assert_close(guided_eps(Net(), x, t, y, w), eps_u + s * (eps_c - eps_u))
    assert "exactly class-uniform" in conventions(None)["labels"]
    assert conventions(None)["guidance"]["diffusers_guidance_scale"] is None


def _small(record: dict) -> dict:
    """Per-class entries as the evaluator writes small comparisons."""
    record["protocol"]["metrics"] = ["fid", "precision", "recall"]
    for c, entry in enumerate(record["metrics"]["per_class"].values()):
        entry.update(small_sample=True, primary="kid", kid=0.01 * (c + 1), kid_std=0.002)
    return record


def test_small_comparisons_show_kid_with_its_std_first_and_fid_marked(tmp_path, capsys) -> None:
    from lt_diffusion.evaluation.run import print_table

    record = _small(make_record())
    validate(record)
    print_table(record)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "KID ± std" in line)
    assert header.index("KID ± std") < header.index("FID")
    assert "0.0300 ± 0.0020" in out and "40.00*" in out  # class 2: KID first, FID marked
    assert "30.50*" not in out  # overall: 100 / 200 images, but not flagged small here
    assert "Reference: the training split." in out
    assert "10 of 14 comparisons have fewer than 2048 images" in out
    assert "compare only with numbers of the same protocol" in out
    path = plot_fid_vs_count(record, tmp_path / "kid.png")
    fid_plot = plot_fid_vs_count(make_record(), tmp_path / "fid.png")
    assert path.read_bytes() != fid_plot.read_bytes()
