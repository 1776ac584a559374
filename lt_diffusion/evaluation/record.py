"""One JSON record per evaluated run (DESIGN.md, Records); tables are built only from these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lt_diffusion.utils.io import atomic_write_json

SCHEMA_VERSION = 1
REQUIRED = (
    "schema",
    "config",
    "dataset",
    "checkpoint",
    "sampler",
    "extractor",
    "protocol",
    "metrics",
)


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Validate, then write atomically (an old record survives any failure)."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    json.dumps(record)  # fail before touching the file if anything is not JSON-able
    return atomic_write_json(path, record)


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable record ({err}): re-run the evaluation") from err
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{path} is not an lt-diffusion record (missing {missing})")
    return record
