"""The denoiser passes per example each objective declares (``Objective.passes``, a table's
estimate of a job's cost) are the passes it makes: counted through a hook on the network, on
steps that keep the condition; and a wave of jobs starts with its costliest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lt_diffusion.runs.build import build_model, build_objective, build_schedule, objective_passes
from lt_diffusion.tables import ResolvedRun
from lt_diffusion.tables.launch import costliest_first, training_work
from lt_diffusion.tables.spec import RunRef
from lt_diffusion.tables.sweep import Job
from tests.conftest import CONFIG_DIR, compose_config

TOY = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment" / "toy").glob("toy2d_*.yaml"))


@pytest.mark.parametrize("experiment", TOY)
def test_declared_passes_are_the_passes_made(experiment: str) -> None:
    cfg = compose_config("train", [f"experiment=toy/{experiment}"])
    model, objective, schedule = build_model(cfg), build_objective(cfg), build_schedule(cfg)
    for m in objective.modules():  # a dropped condition skips class-dependent terms
        if hasattr(m, "cond_drop_prob"):
            m.cond_drop_prob = 0.0
    objective.setup([40, 20, 10, 5, 3, 3, 2, 2, 1, 1], seed=0)
    objective.bind(model, schedule, None)
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    batch, steps = 16, 3
    for _ in range(steps):
        objective(model, torch.randn(batch, 2), torch.randint(0, 10, (batch,)), schedule)
    assert sum(seen) / (batch * steps) == objective_passes(cfg.method.objective)


def test_a_wave_starts_with_its_costliest_jobs() -> None:
    def resolved(experiment: str, steps: int) -> ResolvedRun:
        cfg = compose_config("train", [f"experiment=toy/{experiment}", f"train.max_steps={steps}"])
        return ResolvedRun(RunRef(experiment, 0), cfg, Path(experiment), {})

    runs = [
        resolved("toy2d_ddpm", 100),
        resolved("toy2d_pd_cbdm", 100),
        resolved("toy2d_cbdm", 300),
    ]
    work = {r.run.key: training_work(r) for r in runs}
    assert work[runs[1].run.key] == 4 * work[runs[0].run.key]  # four passes against one
    jobs = [Job(r.run.key, [], str(r.run_dir), 1, 1) for r in runs]
    assert [j.key for j in costliest_first(jobs, work)] == [
        runs[2].run.key,
        runs[1].run.key,
        runs[0].run.key,
    ]
    # A job's cost is its runs' together: ten seeds of DDPM outweigh one PD-CBDM run.
    jobs[0].together = [Job(f"{runs[0].run.key}/{i}", [], "", 1, 1) for i in range(9)]
    work |= {t.key: work[runs[0].run.key] for t in jobs[0].together}
    assert costliest_first(jobs, work)[0].key == runs[0].run.key
    assert OmegaConf.select(runs[0].config, "data.batch_size") > 0


def test_a_classification_run_has_a_cost_too() -> None:
    """A classifier's budget is in epochs (``train.max_steps: null``): it still orders."""
    cfg = compose_config("classify", ["experiment=classify/cm/cifar100_lt_ir100_ce"])
    assert cfg.train.max_steps is None
    assert training_work(ResolvedRun(RunRef("classify/x", 0), cfg, Path("x"), {})) > 0
