"""The house rules the layout promises: the library never imports Prefect, the Prefect
details the command line relies on hold for the Prefect version pyproject.toml pins, and
every package the code imports is declared."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from distilq.cli.api import PREFECT_CALLABLES, SERVER_ENV, SERVER_SETTINGS
from tests.conftest import ROOT


def test_no_library_module_imports_prefect():
    """Every module under src/distilq but the command line, imported in a fresh interpreter."""
    code = """
import json, pkgutil, sys
import distilq
names = [m.name for m in pkgutil.walk_packages(distilq.__path__, "distilq.")]
library = [n for n in names if not n.startswith("distilq.cli")]
for name in library:
    __import__(name)
prefect = sorted(m for m in sys.modules if m.split(".")[0] == "prefect")
print(json.dumps({"library": library, "prefect": prefect}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    # The walk found the folders, not just the top level.
    assert {"distilq.pipelines.score", "distilq.quantize.kernels.token_linear",
            "distilq.gate.attest", "distilq.storage.store"} <= set(found["library"])  # fmt: skip
    assert found["prefect"] == []


def test_prefect_is_pinned_to_the_minor_version_its_details_were_checked_on():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [Requirement(r) for r in project["dependencies"] if r.startswith("prefect>")]
    installed = Version(version("prefect"))
    assert pin.specifier.contains(installed)
    next_minor = f"{installed.major}.{installed.minor + 1}.0"
    assert not pin.specifier.contains(next_minor), f"{pin} lets in Prefect {next_minor}"


def test_the_prefect_details_the_cli_relies_on_exist():
    for path in PREFECT_CALLABLES:
        module, _, attribute = path.partition(":")
        target = importlib.import_module(module)
        for part in attribute.split("."):
            target = getattr(target, part)
        assert callable(target), path
    # Read straight from the environment by the server's module, not through settings.
    server_source = inspect.getsource(importlib.import_module("prefect.server.api.server"))
    for name in set(SERVER_ENV) - set(SERVER_SETTINGS):
        assert f'"{name}"' in server_source, name


def test_the_server_environment_reaches_prefects_settings():
    """Each variable the temporary server is launched with sets the setting it is meant to."""
    code = """
import json, sys
from prefect.settings import get_current_settings
settings = get_current_settings()
def read(path):
    value = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value
print(json.dumps({name: read(path) for name, path in json.loads(sys.argv[1]).items()}))
"""
    values = {name: SERVER_ENV.get(name, "7") for name in SERVER_SETTINGS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | values
    argv = [sys.executable, "-c", code, json.dumps(SERVER_SETTINGS)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    read = json.loads(done.stdout.splitlines()[-1])
    expected = {name: False if value in ("0", "false") else float(value)
                for name, value in values.items()}  # fmt: skip
    assert read == expected


def _imported(*roots: str) -> set[str]:
    """Top-level modules imported anywhere under `roots` (absolute imports)."""
    found = set()
    for root in roots:
        for path in (ROOT / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"distilq", "tasks", "flows", "tests"}


def _declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    installed_by = packages_distributions()  # module -> the distributions that install it
    optional = extras["charts"] + extras["mlflow"] + extras["onnxruntime"]
    for roots, declared in (
        # matplotlib: the optional `charts` extra (reports are written without a chart without
        # it); mlflow and pandas: the optional `mlflow` extra (the MLflow mirror); onnxruntime,
        # onnx and onnxscript: the optional `onnxruntime` extra (its engine)
        (
            ("src", "tasks", "flows", "deployments"),
            _declared(project["dependencies"] + optional),
        ),
        (("tests",), _declared(project["dependencies"] + extras["dev"] + optional)),
    ):
        for module in sorted(_imported(*roots)):
            names = {canonicalize_name(d) for d in installed_by.get(module, [module])}
            assert names & declared, f"{module} is imported under {roots} but not declared"


def test_every_package_of_the_tree_is_in_the_wheel():
    """A folder of modules missing from pyproject.toml's list works in an editable install and
    is absent from a built wheel: every package under src/distilq must be listed."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert found - listed == set()
