"""Reference statistics files: written in the format pytorch-fid / EDM / the CBDM code read, read
back and validated, FID against a file equal to FID from the same features, the command that
writes a dataset's file, and the record's statement of the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.evaluation import evaluator as E
from lt_diffusion.evaluation.dataset_stats import dataset_statistics
from lt_diffusion.evaluation.features import extract_features
from lt_diffusion.evaluation.identity import evaluation_identity
from lt_diffusion.evaluation.metrics import Statistics, statistics
from lt_diffusion.evaluation.stats_file import (
    StatsFileError,
    check_space,
    read_stats,
    write_stats,
)
from tests.conftest import compose_config
from tests.stand_ins import PooledPixels, stand_in_space
from tests.test_feature_spaces import INFO, _Data, _images, _protocol, fd_float64

pytestmark = pytest.mark.filterwarnings(
    "ignore::lt_diffusion.evaluation.metrics.SmallSampleWarning"
)

META = {"extractor": "inception-v3-compat", "layer": "2048", "weights_sha256": "ab" * 32}


def _parts(dim: int = 6, seed: int = 0) -> dict[str, Statistics]:
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("overall", 40), ("few", 12), ("class_003", 5)):
        out[part] = statistics(rng.normal(size=(n, dim)) + rng.normal(size=dim))
    return out


def test_a_written_file_is_read_back_as_pytorch_fid_and_the_cbdm_code_read_it(tmp_path) -> None:
    parts = _parts()
    path = write_stats(tmp_path / "ref.npz", parts, description="forty points", **META)
    with np.load(path) as f:  # pytorch-fid's / CBDM's / EDM's loading convention
        mu, sigma = f["mu"][:], f["sigma"][:]
    assert mu.dtype == np.float64 and np.array_equal(mu, parts["overall"].mu)
    assert np.array_equal(sigma, parts["overall"].sigma)
    back = read_stats(path)
    assert set(back.parts) == set(parts) and back.parts["class_003"].n == 5
    assert np.array_equal(back.parts["few"].sigma, parts["few"].sigma)
    assert (back.extractor, back.layer, back.description) == (
        "inception-v3-compat",
        "2048",
        "forty points",
    )
    # A file of the other codes: mu and sigma only, no count or extractor.
    np.savez(tmp_path / "theirs.npz", mu=mu, sigma=sigma)
    theirs = read_stats(tmp_path / "theirs.npz")
    assert theirs.parts["overall"].n is None and theirs.extractor is None and theirs.dim == 6


def _bad(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"mu": np.zeros((2, 3)), "sigma": np.eye(3)}, r"mu must be \(D,\) and sigma \(D, D\)"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"got \(3,\) and \(4, 4\)"),
        ({"mu": np.zeros(3), "sigma": np.triu(np.ones((3, 3)))}, "sigma is not symmetric"),
        ({"mu": np.zeros(3), "sigma": np.diag([1.0, np.nan, 1.0])}, "NaN or inf"),
        ({"mu": np.zeros(3), "sigma": np.diag([1.0, np.inf, 1.0])}, "NaN or inf"),
        ({"mean": np.zeros(3)}, "has no mu / sigma"),
        ({"mu": np.zeros(3), "sigma": np.eye(3), "mu_few": np.zeros(3)}, "mu_few without its sigma"),
        ({"mu": np.zeros(3), "sigma": np.eye(3), "mu_few": np.zeros(4), "sigma_few": np.eye(4)},
         "different dimensions"),
    ],
)  # fmt: skip
def test_malformed_files_are_refused_naming_the_problem(tmp_path, arrays, message) -> None:
    path = _bad(tmp_path / "bad.npz", **arrays)
    with pytest.raises(StatsFileError, match=message) as err:
        read_stats(path)
    assert str(path) in str(err.value)


def test_files_of_another_extractor_or_dimension_are_refused(tmp_path) -> None:
    path = write_stats(tmp_path / "d.npz", _parts(dim=6), description="x", **META)
    with pytest.raises(StatsFileError, match="6-dimensional.*which have 2048 dimensions"):
        check_space(read_stats(path), "inception-v3-compat", 2048, "fid")
    other = write_stats(
        tmp_path / "o.npz", _parts(dim=6), description="x", **{**META, "extractor": "vgg16"}
    )
    with pytest.raises(StatsFileError, match="holds vgg16 statistics; fd_dinov2 is computed on"):
        check_space(read_stats(other), "dinov2-vit-l-14", 6, "fd_dinov2")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StatsFileError, match="not a readable .npz"):
        read_stats(tmp_path / "junk.npz")


class _Tiny(_Data):
    """The test datamodule with what a statistics file describes."""

    def info(self) -> dict:
        return {**super().info(), "ratio": 1, "subset_seed": 0}


def test_fid_against_a_written_file_equals_fid_against_the_same_real_features(
    tmp_path, monkeypatch
) -> None:
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    data = _Tiny()
    path, parts = dataset_statistics(data, tmp_path / "ref.npz", cache_dir=tmp_path / "cache")
    assert set(parts) == {"overall", "many", "medium", "few", "class_000", "class_001", "class_002"}
    assert parts["overall"].n == 18 and parts["few"].n == 6
    folder = (_images(15, seed=3), torch.arange(15) % 3)
    run = dict(
        dataset_info=INFO, datamodule=data, cache_dir=tmp_path / "cache",
        device=torch.device("cpu"), folder=folder,
    )  # fmt: skip
    splits = {"generated": 4, "real_per_class": None}
    own = E.run_protocol(protocol=_protocol(metrics=["fid"], per_split=splits), **run)
    ref = E.run_protocol(
        protocol=_protocol(metrics=["fid"], per_split=splits, reference=str(path)), **run
    )
    for kind in ("overall", "per_split", "per_class"):
        a, b = own["metrics"][kind], ref["metrics"][kind]
        for name in [None] if kind == "overall" else a:
            ea, eb = (a, b) if name is None else (a[name], b[name])
            assert eb["fid"] == pytest.approx(ea["fid"], rel=1e-9, abs=1e-9), (kind, name)
    real = extract_features(
        torch.cat([data.reference_set([c])[0] for c in range(3)]), PooledPixels()
    )
    first = torch.cat([torch.nonzero(folder[1] == c).flatten()[:4] for c in range(3)])
    fake = extract_features(folder[0][first], PooledPixels())["pool"]
    assert ref["metrics"]["overall"]["fid"] == pytest.approx(
        fd_float64(real["pool"], fake), rel=1e-6
    )
    stated = ref["reference"]
    assert stated["origin"] == "file" and stated["sha256"] == read_stats(path).sha256
    assert stated["counts"]["overall"] == 18 and "full training split" in stated["description"]
    assert ref["metrics"]["overall"]["n_real"] == 18
    assert own["reference"]["origin"] == "dataset" and own["reference"]["split"] == "train"


def test_a_file_stands_in_only_where_it_can(tmp_path, monkeypatch) -> None:
    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    overall_only = write_stats(
        tmp_path / "o.npz", {"overall": _parts(dim=48)["overall"]}, description="x", **META
    )
    run = dict(
        dataset_info=INFO, datamodule=_Data(), cache_dir=tmp_path, device=torch.device("cpu")
    )
    with pytest.raises(StatsFileError, match=r"\['kid', 'recall'\] need the real images' feat"):
        E.run_protocol(protocol=_protocol(reference=str(overall_only)), **run)
    with pytest.raises(StatsFileError, match=r"not of \['class_000', 'class_001', 'class_002'\]"):
        E.run_protocol(protocol=_protocol(metrics=["fid"], reference=str(overall_only)), **run)
    small = write_stats(tmp_path / "s.npz", _parts(dim=6), description="x", **META)
    with pytest.raises(StatsFileError, match="6-dimensional.*48 dimensions.*leave fid out"):
        E.run_protocol(protocol=_protocol(metrics=["fid"], reference=str(small)), **run)


def test_a_record_is_identified_by_the_files_content_not_its_path(tmp_path) -> None:
    path = write_stats(tmp_path / "a.npz", _parts(), description="x", **META)
    moved = tmp_path / "elsewhere" / "b.npz"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    other = write_stats(tmp_path / "c.npz", _parts(seed=1), description="x", **META)

    def digest(*overrides: str) -> str:
        cfg = compose_config("evaluate", ["eval=quick", *overrides])
        return evaluation_identity(
            train_config={"seed": 0}, protocol=cfg.eval, sampler=None, guidance=0.0,
            theta_g_only=False,
        )["digest"]  # fmt: skip

    plain = digest()
    assert digest(f"eval.reference={path}") == digest(f"eval.reference={moved}") != plain
    assert digest(f"eval.reference={other}") != digest(f"eval.reference={path}")
    # Feature spaces: naming a metric's own space defines nothing new; another space does.
    assert digest("eval.features={}") == plain == digest("eval.features.kid=inception")
    assert digest("eval.features.kid=dinov2") != plain
    assert OmegaConf.to_container(compose_config("evaluate", ["eval=quick"]).eval.features)


def test_the_command_writes_the_reference_and_the_training_statistics(
    tmp_path, monkeypatch, capsys
) -> None:
    from lt_diffusion import reference_stats
    from tests.fakedata import write_cifar10

    stand_in_space(monkeypatch, PooledPixels(), dim=48)
    write_cifar10(tmp_path / "data" / "cifar10", n_per_class=20, test_per_class=2)
    common = [
        "dataset=cifar10_lt", "imbalance=ir10", f"paths.data_root={tmp_path / 'data'}",
        "dataset.source.download=false", f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu",
    ]  # fmt: skip
    path = reference_stats.run([*common, f"out={tmp_path / 'ref.npz'}"])
    ref = read_stats(path)
    assert ref.parts["overall"].n == 200 and len(ref.parts) == 1 + 3 + 10
    assert "full training split of cifar10_lt" in ref.description
    printed = capsys.readouterr().out
    assert f"Written: {path}" in printed and "overall 200" in printed
    train = read_stats(reference_stats.run([*common, "set=train", f"out={tmp_path / 't.npz'}"]))
    counts = [train.parts[f"class_{c:03d}"].n for c in range(10)]
    assert counts[0] == 20 and counts == sorted(counts, reverse=True) and counts[-1] < 20
    assert train.parts["overall"].n == sum(counts) and "long-tailed" in train.description
    with pytest.raises(SystemExit, match="needs out=<file.npz>"):
        reference_stats.run(common)
