"""A tiny two-row table (DDPM and CBDM rows of Imb. CIFAR-10) for the sweep tests: real
experiment rows, shrunk by overrides to seconds-long CPU runs on the tiny CIFAR-10."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import tiny_eval

# A ~40-image evaluation: enough for every overall metric, cheap on two cores.
TINY_EVAL = tiny_eval()

TINY_TRAIN = [
    "imbalance=ir10",  # 20 images per class: IR 100 would leave the tail classes empty
    "model=unet_tiny",
    "trainer=cpu",
    "logger=csv",
    "dataset.source.download=false",
    "data.batch_size=8",
    "train.warmup_steps=2",
    "train.ckpt_every=5",
    "train.grid_every=0",
    "train.grid_per_class=1",
    "train.grid_steps=2",
    "train.log_every=5",
]


def write_tiny_table(configs: Path, experiments: dict[str, str] | None = None) -> Path:
    """``<configs>/table/tiny.yaml`` (add ``configs`` to Hydra's search path); returns ``configs``."""
    rows = {
        "ddpm": "cm/cifar10_lt_ir100_ddpm",
        "cbdm": "cm/cifar10_lt_ir100_cbdm",
        **(experiments or {}),
    }
    spec = {
        "name": "tiny",
        "title": "Tiny table (tests)",
        "source": "CM paper Table 2 (published values for comparison only)",
        "seeds": [0],
        "eval": "quick",
        "sampler": "ddim",
        "columns": [
            {"key": "fid", "label": "FID", "metric": "overall.fid", "better": "lower", "digits": 2},
            {"key": "recall", "label": "Recall", "metric": "overall.recall", "better": "higher"},
        ],
        "blocks": [
            {
                "label": "CIFAR-10-LT, IR=100",
                "rows": [
                    {"label": "DDPM", "experiment": rows["ddpm"], "published": [10.697, 0.47]},
                    {"label": "CBDM", "experiment": rows["cbdm"], "published": [8.233, 0.53]},
                ],
            }
        ],
    }
    (configs / "table").mkdir(parents=True, exist_ok=True)
    (configs / "table" / "tiny.yaml").write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return configs


def tiny_table_overrides(data_root: Path, *extra: str) -> list[str]:
    """Table-command overrides: the tiny data root and the tiny training of every run."""
    train = [*TINY_TRAIN, *extra]
    return [
        f"paths.data_root={data_root}",
        f"train_overrides=[{','.join(json.dumps(o) for o in train)}]",
    ]
