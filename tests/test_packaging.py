"""pyproject declares what the code imports: a fresh `pip install .` (or `asyncllm[client]`) must
not depend on packages that only happen to be installed next to the dev extras."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Imported only where they must exist already: trio under a running trio loop, triton for the
# GPU kernels (lazily, behind checks that it imports).
OPTIONAL = {"trio", "triton"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _third_party_imports(paths: list[Path]) -> set[str]:
    mods: set[str] = set()
    for f in paths:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "asyncllm"}


def _distributions(modules: set[str]) -> dict[str, str]:
    pd = packages_distributions()
    missing = sorted(m for m in modules if m not in pd)
    assert not missing, f"imported but not installed here: {missing}"
    return {m: _norm(pd[m][0]) for m in modules}


def test_every_runtime_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    declared = _requirement_names(project["dependencies"])
    imports = _third_party_imports(sorted((ROOT / "asyncllm").rglob("*.py"))) - OPTIONAL
    assert {"torch", "anyio", "websockets"} <= imports  # the scan sees the code
    undeclared = {m: d for m, d in _distributions(imports).items() if d not in declared}
    assert not undeclared, f"imported by asyncllm/ but not in [project.dependencies]: {undeclared}"


def test_the_client_extra_covers_the_client():
    extra = _requirement_names(_pyproject()["project"]["optional-dependencies"]["client"])
    files = sorted((ROOT / "asyncllm" / "client").rglob("*.py")) + [ROOT / "asyncllm/protocol.py"]
    imports = _third_party_imports(files)
    assert "websockets" in imports
    undeclared = {m: d for m, d in _distributions(imports).items() if d not in extra}
    assert not undeclared, f"imported by asyncllm.client but not in the client extra: {undeclared}"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", setup, re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    commands = _readme_commands()
    assert len(commands) == 2, commands  # serve the default model; run the tests
    test_command = commands[1]
    assert "python -m pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, "the README's test command is not a line of .ci/run"
    # the browser tests (tests/test_chat_page.py) run in CI: the set-up installs Chromium first
    assert test_command.index("bash ops/ci/") < test_command.index("python -m pytest")
    assert (ROOT / "ops" / "ci" / re.search(r"bash ops/ci/(\S+)", test_command)[1]).is_file()
