"""Every command's ``--help`` prints what it does, its main options and its config groups, and
exits 0 (no traceback), both as ``python -m lt_diffusion.<command>`` and as the installed
``ltd-*`` script; ``--hydra-help`` works too. Each check runs in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

# command -> what its help must name: its main options and the config groups it lists
EXPECTED = {
    "train": ["experiment=", "dataset:", "imbalance:", "method:", "trainer:", "seed: 0"],
    "sample": ["checkpoint=", "n_per_class=", "sampler:", "guidance"],
    "evaluate": ["checkpoint=", "images=", "eval:", "theta_g_only"],
    "table": ["table=<name>", "table: cm_table1", "train_overrides", "launch=false"],
    "classify": ["experiment=classify/", "loss:", "capacity:", "augment:", "seed: 0"],
    "analyze": ["analysis:", "checkpoint=", "theta_g_only"],
    "job": ["manifest=", "job=<index>", "not meant to be run by hand"],
    "prepare_data": ["dataset: ", "imbalance: ", "ir100", "dataset=cifar10_lt"],
    "reference_stats": ["out=<file.npz>", "set=reference", "features=", "eval.reference="],
}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # This checkout first on the path, also for the installed scripts (an editable install may
    # point at another checkout).
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _check_help(res: subprocess.CompletedProcess, command: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in out and "Error" not in out, out[-3000:]
    assert f"lt_diffusion.{command}" in res.stdout  # the header names the command
    for needle in EXPECTED[command]:
        assert needle in res.stdout, f"{command} --help lacks {needle!r}:\n{res.stdout}"


def test_every_script_is_a_command_checked_here() -> None:
    targets = {v.removeprefix("lt_diffusion.").removesuffix(":main") for v in SCRIPTS.values()}
    assert targets <= set(EXPECTED) and all(v.endswith(":main") for v in SCRIPTS.values())
    assert set(EXPECTED) - targets == {"job"}  # started by lt_diffusion.table, not by hand


# Runs every command's main with --help in one interpreter (each a separate Hydra app), so the
# heavy imports are paid once; prints {command: [exit code, stdout]} as JSON.
DRIVER = """
import contextlib, io, json, sys
from importlib import import_module
from hydra.core.global_hydra import GlobalHydra
out = {}
for command in sys.argv[1:]:
    GlobalHydra.instance().clear()  # each command is its own Hydra app
    buf = io.StringIO()
    sys.argv = [command, "--help"]
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            import_module(f"lt_diffusion.{command}").main()
        except SystemExit as end:
            code = end.code or 0
    out[command] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_every_command_prints_its_help_and_exits_0() -> None:
    """What ``python -m lt_diffusion.<command> --help`` and ``ltd-<command> --help`` run: each
    command's ``main`` with ``--help`` (one process for all of them)."""
    res = _run([sys.executable, "-c", DRIVER, *EXPECTED])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for command, (code, out) in json.loads(res.stdout.splitlines()[-1]).items():
        _check_help(subprocess.CompletedProcess([], code, out, ""), command)


@pytest.mark.parametrize(
    "script",
    [s if s == "ltd-table" else pytest.param(s, marks=pytest.mark.slow) for s in sorted(SCRIPTS)],
)
def test_installed_script_help(script: str) -> None:
    """An installed ``ltd-<x>`` script itself (``ltd-table``, whose --help failed, by default)."""
    path = Path(sys.executable).with_name(script)
    module, _ = SCRIPTS[script].split(":")
    cmd = (
        [str(path), "--help"]
        if path.is_file()
        else [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())",
              "--help"]
    )  # fmt: skip
    _check_help(_run(cmd), module.removeprefix("lt_diffusion."))


@pytest.mark.parametrize("command", ["table", pytest.param("job", marks=pytest.mark.slow)])
def test_python_m_help(command: str) -> None:
    """``python -m`` for the command without a script and for the one whose --help failed
    (``table: ???`` in configs/sweep.yaml)."""
    _check_help(_run([sys.executable, "-m", f"lt_diffusion.{command}", "--help"]), command)


HYDRA_COMMANDS = [c for c in EXPECTED if c not in ("prepare_data", "reference_stats")]


@pytest.mark.parametrize(
    "command",
    [c if c == "table" else pytest.param(c, marks=pytest.mark.slow) for c in HYDRA_COMMANDS],
)
def test_hydra_help(command: str) -> None:
    """Hydra's own help (it composes no command config, so one command is checked by default)."""
    res = _run([sys.executable, "-m", f"lt_diffusion.{command}", "--hydra-help"])
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "hydra/launcher: " in res.stdout and "slurm" in res.stdout


def test_prepare_data_refuses_hydra_flags() -> None:
    # prepare_data is no Hydra app: Hydra's flags get a sentence, not a traceback.
    res = _run([sys.executable, "-m", "lt_diffusion.prepare_data", "--hydra-help"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "takes key=value overrides only" in res.stderr


def test_table_without_a_table_says_how_to_choose_one(tmp_path: Path) -> None:
    res = _run([sys.executable, "-m", "lt_diffusion.table", f"paths.output_dir={tmp_path}"])
    assert res.returncode != 0
    assert "choose the table to reproduce: table=<name>, one of cm_table1" in res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tables").exists()


COMPLETE = """
eval "$(ltd-train -sc install=bash)"
for line in "ltd-train callb" "ltd-train callbacks=" "ltd-train train.ckpt_"; do
    COMP_LINE="$line"; COMP_POINT=${#line}; words=($line); COMP_CWORD=$((${#words[@]} - 1))
    hydra_bash_completion
    echo "${COMPREPLY[*]}"
done
"""


def test_bash_completion_of_the_installed_command() -> None:
    """README: ``eval "$(ltd-train -sc install=bash)"`` completes groups, options and keys (the
    completion function is run as bash runs it on TAB)."""
    script = Path(sys.executable).with_name("ltd-train")
    if not script.is_file():
        pytest.skip(f"{script} is not installed (pip install -e . installs the ltd-* scripts)")
    path = f"{script.parent}{os.pathsep}{os.environ['PATH']}"
    res = _run(["bash", "-c", f'PATH="{path}"\n{COMPLETE}'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [
        "callbacks. callbacks=",
        "callbacks=default callbacks=none",
        "train.ckpt_every=",
    ]
