"""docs/extending.md's recipe for a new method, followed as a user outside the package would:
one module, one config, one test, and no file of the project touched (the module sits on the
Python path, its config in a Hydra search-path folder). The metric recipe is followed in
tests/test_metrics.py (test_a_new_metric_is_one_registry_entry)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import compose_config

METHOD = '''
from typing import Any

from torch import Tensor

from lt_diffusion.diffusion import NoiseSchedule
from lt_diffusion.methods.base import Objective, ObjectiveOutput, Result, Step, mse


class HalfObjective(Objective):
    """The DDPM loss times a weight: the smallest method there is."""

    name = "half"

    def __init__(self, weight: float = 0.5, **dropout: Any) -> None:
        super().__init__(**dropout)
        self.weight = float(weight)

    def loss(self, s: Step, x0: Tensor, y: Tensor, schedule: NoiseSchedule) -> Result:
        eps = s.predict()
        loss = self.weight * mse(eps, s.noise)
        return ObjectiveOutput(loss, {"half": loss.detach()}), s.context(eps)
'''
CONFIG = """\
defaults:
  - /objective@objective: ddpm   # the label dropout settings of the base objective
  - _self_
name: half
data_sampler: null
model_transform: null
objective:
  _target_: my_methods.half.HalfObjective
  weight: 0.5
"""


def test_a_new_method_is_one_module_one_config_one_test(
    train_overrides, tmp_path: Path, monkeypatch
) -> None:
    package = tmp_path / "code" / "my_methods"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "half.py").write_text(METHOD)
    (tmp_path / "configs" / "method").mkdir(parents=True)
    (tmp_path / "configs" / "method" / "half.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    search = f"hydra.searchpath=[file://{tmp_path / 'configs'}]"

    from lt_diffusion import train
    from lt_diffusion.methods.ddpm import DDPMObjective
    from lt_diffusion.runs.build import build_model, build_objective, build_schedule
    from lt_diffusion.runs.checkpoint import read_checkpoint

    run_dir = tmp_path / "run"
    cfg = compose_config(
        "train", [*train_overrides("method=half", "train.max_steps=2"), search,
                  f"paths.run_dir={run_dir}"]
    )  # fmt: skip
    train.run(cfg)
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert ckpt["lt_diffusion"]["config"]["method"]["name"] == "half"

    # The loss is what the module says: half the DDPM loss on the same draw.
    objective, model, schedule = build_objective(cfg), build_model(cfg), build_schedule(cfg)
    assert type(objective).__name__ == "HalfObjective"
    x0, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = []
    for obj in (objective, DDPMObjective(cond_drop_prob=0.0)):
        obj.cond_drop_prob = 0.0
        obj.setup([20] * 10)
        torch.manual_seed(0)
        losses.append(obj(model, x0, y, schedule).loss)
    torch.testing.assert_close(losses[0], 0.5 * losses[1])
