"""The seed-vectorised training of the synthetic benchmark (lt_diffusion/training/vectorized.py):
a seed's run is the same whether it trains alone or beside other seeds, resumes exactly,
clips each seed's gradients by its own norm, refuses what it cannot train together, and a
table trains a row's seeds as one job; the keyed draws (lt_diffusion/utils/draws.py) are per
key, whatever the vmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.func import vmap

from lt_diffusion.runs.checkpoint import CheckpointError, read_checkpoint
from lt_diffusion.training import vectorized
from lt_diffusion.utils import draws
from tests.conftest import compose_config

SMALL = ["dataset.source.n_per_class=100", "data.batch_size=32", "train.log_every=5",
         "callbacks.sample_grid=null", "train.warmup_steps=2"]  # fmt: skip


def configs(out: Path, seeds: list[int], steps: int, method: str = "ddpm", extra=()) -> list:
    cfgs = []
    for s in seeds:
        cfg = compose_config(
            "train",
            [f"experiment=toy/toy2d_{method}", f"seed={s}", f"imbalance.seed={s}",
             f"train.max_steps={steps}", f"paths.output_dir={out}", *SMALL, *extra],
        )  # fmt: skip
        cfg.paths.run_dir = str(out / "runs" / str(cfg.run_name))
        cfgs.append(cfg)
    return cfgs


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.parametrize("method", ["ddpm", "oc"])
def test_a_seed_trains_the_same_alone_or_beside_others(tmp_path: Path, method: str) -> None:
    group = vectorized.run(configs(tmp_path / "group", [0, 1, 2], 6, method))
    alone = vectorized.run(configs(tmp_path / "alone", [1], 6, method))
    a, b = weights(group[1]), weights(alone[0])
    assert a.keys() == b.keys() and any(k.startswith("ema_model.") for k in a)
    for k in a:  # the same draws; batched matmuls may round differently
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    other = weights(group[0])
    assert not torch.allclose(other["model.head.weight"], a["model.head.weight"])
    # Each run is an ordinary run: its config, checkpoint step, log and export.
    ckpt = read_checkpoint(group[1] / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and ckpt["lt_diffusion"]["config"]["seed"] == 1
    log = (group[1] / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and [r.split(",")[0] for r in log[1:]] == ["5", "6"]
    assert (group[1] / "export" / "ema.safetensors").is_file()
    if method == "oc":  # the cross-class transfer rate per timestep bucket is logged
        assert "cross_t0" in log[0] and "cross_t9" in log[0]


def test_an_interrupted_group_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    straight = vectorized.run(configs(tmp_path / "a", [0, 1], 8, "focal"))  # stateful objective
    stream = vectorized._stream

    def interrupted(m, start):  # Ctrl-C after 4 batches: the engine saves step 4, re-raises
        it = stream(m, start)
        for _ in range(4):
            yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(vectorized, "_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vectorized.run(configs(tmp_path / "b", [0, 1], 8, "focal"))
    monkeypatch.undo()
    run_dir = tmp_path / "b" / "runs" / "toy2d-ir100-subset1-focal-seed1"  # imbalance.seed 1
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = vectorized.run(configs(tmp_path / "b", [0, 1], 8, "focal"))
    for x, y in zip(straight, resumed):
        a, b = weights(x), weights(y)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = [r.split(",")[0] for r in (run_dir / "train_log.csv").read_text().splitlines()[1:]]
    assert rows == ["4", "5", "8"]  # the interrupted interval's mean, then the resumed ones
    # The cosine schedule depends on the budget: a longer budget is another run.
    with pytest.raises(CheckpointError, match="tag=-steps"):
        vectorized.run(configs(tmp_path / "b", [0, 1], 12, "focal"))


def test_gradients_are_clipped_per_seed() -> None:
    g = [torch.randn(3, 4, 5) * torch.tensor([0.01, 1.0, 10.0])[:, None, None],
         torch.randn(3, 7) * torch.tensor([0.01, 1.0, 10.0])[:, None]]  # fmt: skip
    ts = [torch.zeros_like(x, requires_grad=True) for x in g]
    for t, x in zip(ts, g):
        t.grad = x.clone()
    vectorized._clip_per_seed(ts, 1.0)
    for s in range(3):  # torch's own clip of seed s's gradients alone
        own = [torch.zeros_like(x[s], requires_grad=True) for x in g]
        for t, x in zip(own, g):
            t.grad = x[s].clone()
        torch.nn.utils.clip_grad_norm_(own, 1.0)
        for t, o in zip(ts, own):
            torch.testing.assert_close(t.grad[s], o.grad)


def test_runs_that_cannot_train_together_are_refused(tmp_path: Path) -> None:
    a = configs(tmp_path, [0], 4)[0]
    b = configs(tmp_path, [1], 4, extra=["optimizer.lr=1e-3"])[0]
    with pytest.raises(ValueError, match="differ only in"):
        vectorized.run([a, b])
    img = compose_config("train", ["experiment=fashion_mnist_demo", "+train.engine=vectorized"])
    with pytest.raises(ValueError, match="model=mlp"):
        vectorized.check_group([img])


def test_a_table_trains_a_rows_seeds_as_one_job(tmp_path: Path) -> None:
    from lt_diffusion.tables.launch import together
    from lt_diffusion.tables.resolution import ResolvedRun
    from lt_diffusion.tables.spec import RunRef
    from lt_diffusion.tables.sweep import Job

    pairs = []
    for exp, seed in [("ddpm", 0), ("ddpm", 1), ("oc", 0), ("ddpm", 2)]:
        cfg = compose_config(
            "train", [f"experiment=toy/toy2d_{exp}", f"seed={seed}", f"imbalance.seed={seed}"]
        )
        run = ResolvedRun(RunRef(f"toy/toy2d_{exp}", seed), cfg, tmp_path / str(seed), {})
        pairs.append((Job(f"{exp}/{seed}", [], str(tmp_path), 1, 1), run))
    image = compose_config("train", ["experiment=fashion_mnist_demo"])
    pairs.append(
        (Job("fm", [], str(tmp_path), 1, 1), ResolvedRun(RunRef("f", 0), image, tmp_path, {}))
    )
    jobs = together(pairs)
    assert [j.key for j in jobs] == ["ddpm/0", "oc/0", "fm"]
    assert [j.key for j in jobs[0].together] == ["ddpm/1", "ddpm/2"] and not jobs[1].together


def test_keyed_draws_are_per_key_whatever_the_vmap() -> None:
    def f(key: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with draws.keyed(key, 5):
            return (
                draws.rand((4000,)),
                draws.randn_like(torch.zeros(4000)),
                draws.randint(0, 10, (4000,)),
            )

    batched = vmap(f, randomness="error")(torch.tensor([3, 8, 11]))
    alone = f(torch.tensor(8))
    for b, a, i in zip(batched, alone, f(8)):  # a tensor key or a plain int: the same numbers
        assert torch.equal(b[1], a) and torch.equal(a, i)
    assert not torch.equal(batched[0][0], batched[0][1])
    u, z, k = (x.double().numpy() for x in alone)
    assert stats.kstest(u, "uniform").pvalue > 1e-3 and stats.kstest(z, "norm").pvalue > 1e-3
    assert np.bincount(k.astype(int), minlength=10).min() > 300
    assert not draws.active()  # outside a keyed block: torch's own generator
    torch.manual_seed(0)
    x = draws.rand((5,))
    torch.manual_seed(0)
    assert torch.equal(x, torch.rand(5))
