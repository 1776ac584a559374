"""How many CPU threads torch uses for a piece of work.

Tiny models (the synthetic benchmark's MLP) run faster on one thread: their matrices are too
small to split, and on cores that other processes share, two spinning threads wait on each
other (a DDIM pass over 5000 points took 3 s on one thread and 10-20 s on two, on a busy 2-core
machine). A speed setting only: it does not define a run's or a record's results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int | None, setting: str = "threads") -> Iterator[None]:
    """Within the block torch uses ``threads`` intra-op threads (None: leave it as it is);
    the previous number is restored afterwards. ``setting`` names the config key in errors."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{setting} must be a positive integer or null, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
