"""A command's terminal shows its progress bars, what it is doing, where its outputs are and its
results; third-party noise is filtered where the command starts (:func:`install`, called by
``utils.command.hydra_command``), and the project's own warnings always pass:

- Lightning's tips (``💡 Tip: ... litlogger``),
- Lightning's ``srun`` hint when no SLURM job is running (its advice is for SLURM jobs),
- wandb's settings warnings (``The anonymous setting has no effect``, raised because Lightning
  passes ``anonymous=None``), through wandb's own ``WANDB_SILENT``,
- deprecation warnings (``DeprecationWarning``, ``PendingDeprecationWarning``,
  ``FutureWarning``) raised inside dependencies: they concern their code, not the user's run
  (one raised at a line of this project still shows).

``-v`` / ``--verbose`` / ``verbose=true`` on the command line, or ``LT_DIFFUSION_VERBOSE=1``,
brings all of them back (the flag is passed on to the processes a command starts through the
variable). Lightning's log lines, which its own handler and Hydra's both printed, appear once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableSequence

VERBOSE_ENV = "LT_DIFFUSION_VERBOSE"
_FLAGS = {"-v", "--verbose"}
_TRUE = {"1", "true", "yes", "on"}
# Where Lightning's rank-zero messages (its tips among them) are logged.
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning_fabric.utilities.rank_zero")  # fmt: skip
SRUN_HINT = r"The `srun` command is available on your system but is not used"
TIP_PREFIX = "💡 Tip:"


def take_verbose(argv: MutableSequence[str]) -> bool:
    """Remove ``-v``, ``--verbose`` and ``verbose=<bool>`` from ``argv`` (they are no Hydra
    overrides) and record the choice in :data:`VERBOSE_ENV`; returns whether verbose."""
    for arg in list(argv[1:]):
        key, sep, value = arg.partition("=")
        if arg in _FLAGS or (sep and key.lstrip("+") == "verbose"):
            argv.remove(arg)
            on = arg in _FLAGS or value.lower() in _TRUE
            os.environ[VERBOSE_ENV] = "1" if on else "0"
    return verbose()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in _TRUE


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


_installed = False


def install() -> None:
    """Filter the third-party noise listed above, unless verbose (once per process)."""
    global _installed
    if verbose() or _installed:
        return
    _installed = True
    os.environ.setdefault("WANDB_SILENT", "true")
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        # Inserted in front of the one above: the project's own lines still warn.
        warnings.filterwarnings("default", category=category, module=r"lt_diffusion(\.|$)")
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=SRUN_HINT)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


class _NotLightning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("lightning.", "lightning_fabric"))


def one_lightning_handler() -> None:
    """Lightning prints its log lines with its own console handler, and Hydra's console handler
    on the root logger printed them again: that one now leaves them to Lightning (its log file,
    ``<run>/train.log``, keeps them)."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not any(
            isinstance(f, _NotLightning) for f in handler.filters
        ):
            handler.addFilter(_NotLightning())


def prepare_wandb() -> None:
    """Before a wandb run starts: wandb checks its settings (and warns about them) before it
    reads ``WANDB_SILENT``, so its console is made silent now (``wandb.termsetup``; the run's
    own settings take over when it starts); unless verbose."""
    if verbose():
        return
    import wandb

    wandb.termsetup(wandb.Settings(silent=True), None)
