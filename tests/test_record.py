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
from lt_diffusion.evaluation.record import (
    SCHEMA_VERSION,
    RecordError,
    build_record,
    class_index,
    conventions,
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
