"""pyproject declares what the code imports, in layers: the base dependencies (= the `client`
extra) are the client's only, with no torch; `engine` adds what asyncllm.engine needs, `serve` adds
the gateway. A fresh `pip install .` (or `asyncllm[client]`, `[serve]`) must not depend on packages
that only happen to be installed next to the dev extras."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "asyncllm"
# Imported only where they must exist already: trio under a running trio loop, triton for the
# GPU kernels (lazily, behind checks that it imports).
OPTIONAL = {"trio", "triton", "flash_attn"}  # flash_attn: FA4, imported lazily where installed
ENGINE_ONLY = {"torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy"}


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


def _requirement_extras(req: str) -> set[str]:
    m = re.match(r"[A-Za-z0-9._-]+\s*\[([^\]]*)\]", req)
    return {e.strip() for e in m.group(1).split(",")} if m else set()


def _declared(*extras: str) -> set[str]:
    """The distributions that installing asyncllm with these extras asks for, following extras
    that name asyncllm itself (`asyncllm[engine]`)."""
    project = _pyproject()["project"]
    optional = project["optional-dependencies"]
    names: set[str] = set()
    seen: set[str] = set()
    todo, reqs = list(extras), list(project["dependencies"])
    while reqs:
        for r in reqs:
            (name,) = _requirement_names([r])
            if name == "asyncllm":
                todo += _requirement_extras(r)
            else:
                names.add(name)
        reqs = []
        for extra in todo:
            if extra not in seen:
                seen.add(extra)
                reqs += optional[extra]
        todo = []
    return names


def _installed_closure(names: set[str]) -> set[str]:
    """names and everything they require, transitively, from the installed metadata (markers
    evaluated here, extras of the dependencies not followed)."""
    from packaging.requirements import Requirement

    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(_norm(r.name))
    return out


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


def _undeclared(paths: list[Path], declared: set[str]) -> dict[str, str]:
    imports = _third_party_imports(paths) - OPTIONAL
    return {m: d for m, d in _distributions(imports).items() if d not in declared}


# protocol.py checks params by sampling_params' range table, so the client imports that too.
CLIENT_FILES = sorted((PKG / "client").rglob("*.py")) + [
    PKG / "protocol.py",
    PKG / "sampling_params.py",
]
# What the engine's exports import: asyncllm.engine and the plain modules it uses.
ENGINE_FILES = sorted((PKG / "engine").rglob("*.py")) + [
    PKG / f for f in ("__init__.py", "config.py", "sampling_params.py", "outputs.py")
]


def test_a_client_install_has_no_torch():
    project = _pyproject()["project"]
    base = _requirement_names(project["dependencies"])
    assert _requirement_names(project["optional-dependencies"]["client"]) == base
    assert base == _declared("client") == {"anyio", "websockets", "orjson", "tenacity"}
    # nor anything of the engine's through the client's own dependencies, as installed here
    closure = _installed_closure(base)
    assert not closure & ENGINE_ONLY, sorted(closure & ENGINE_ONLY)
    assert "torch" in _declared("engine") and ENGINE_ONLY <= _declared("serve")


def test_the_base_dependencies_cover_the_client():
    assert "websockets" in _third_party_imports(CLIENT_FILES)  # the scan sees the code
    undeclared = _undeclared(CLIENT_FILES, _declared())
    assert not undeclared, f"imported by asyncllm.client but not a base dependency: {undeclared}"


def test_the_engine_extra_covers_the_engine():
    assert "torch" in _third_party_imports(ENGINE_FILES)
    undeclared = _undeclared(ENGINE_FILES, _declared("engine"))
    assert not undeclared, f"imported by asyncllm.engine but not in asyncllm[engine]: {undeclared}"


BENCH = PKG / "bench"


def test_the_serve_extra_covers_everything():
    paths = sorted(p for p in PKG.rglob("*.py") if BENCH not in p.parents)
    assert {"torch", "starlette", "uvicorn"} <= _third_party_imports(paths)
    undeclared = _undeclared(paths, _declared("serve"))
    assert not undeclared, f"imported by asyncllm/ but not in asyncllm[serve]: {undeclared}"
    assert _declared("serve") <= _declared("bench") <= _declared("dev")


def test_the_bench_extra_covers_the_benchmarks():
    # the peers' workers import the peer engine (vllm, nanovllm, llama_cpp), which is installed
    # where they are measured (ops/bench/setup_vllm_cpu.sh, setup_llamacpp.sh, the device
    # scripts), never by asyncllm
    peers = {"vllm_cpu_worker.py", "peer_run.py", "llamacpp_worker.py"}
    paths = sorted(p for p in BENCH.rglob("*.py") if p.name not in peers)
    assert {"httpx", "matplotlib"} <= _third_party_imports(paths)
    undeclared = _undeclared(paths, _declared("bench"))
    assert not undeclared, f"imported by asyncllm.bench but not in asyncllm[bench]: {undeclared}"


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # as if torch were not installed: `import torch` fails
"""


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_without_torch_the_client_imports_and_the_engine_says_what_to_install():
    r = _run_without_torch(
        """
        import asyncllm.client
        from asyncllm import EngineArgs, SamplingParams  # plain modules, no torch
        for name in ["LLM", "AsyncLLMEngine", "LLMEngine", "EngineDeadError"]:
            try:
                exec(f"from asyncllm import {name}")
            except ImportError as e:
                assert type(e) is ImportError and e.name == "torch", (name, e)
                assert 'pip install "asyncllm[serve]"' in str(e), e
                assert f"asyncllm.{name}" in str(e), e
            else:
                raise AssertionError(name + " imported without torch")
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
        """
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_without_torch_asyncllm_serve_says_what_to_install():
    r = _run_without_torch(
        """
        from asyncllm.cli import main
        sys.exit(main(["serve"]))
        """
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'pip install "asyncllm[serve]"' in r.stderr and "'torch'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


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


def test_the_server_installs_install_the_serve_extra():
    serve_command = _readme_commands()[0]
    assert 'pip install -e ".[serve]"' in serve_command and "asyncllm serve" in serve_command
    assert 'pip install "./[serve]"' in (ROOT / "ops" / "deploy" / "Dockerfile").read_text()
    assert 'pip install -e ".[dev]"' in _readme_commands()[1]  # dev includes serve


@pytest.mark.slow
def test_a_built_wheel_ships_the_chat_page_and_the_benchmarks(tmp_path):
    """`pip install ".[serve]"` (not -e) from a fresh venv: the wheel holds the chat page with its
    vendored JavaScript (served at / and /vendor/) and `asyncllm bench`. The venv sees this
    machine's packages for the dependencies (--system-site-packages; the wheel goes in with
    --no-deps), but asyncllm itself must come from the wheel, run away from the checkout."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "asyncllm", src / "asyncllm", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("asyncllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (
        "chat.html",
        "vendor/marked.umd.js",
        "vendor/purify.min.js",
        "vendor/highlight.min.js",
    ):
        assert f"asyncllm/gateway/static/{f}" in names, f
    assert {"asyncllm/bench/__main__.py", "asyncllm/bench/serving.py"} <= names

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120
    )
    py, exe = venv / "bin" / "python", venv / "bin" / "asyncllm"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = textwrap.dedent(
        """
        import asyncllm
        from starlette.testclient import TestClient
        from asyncllm.gateway import GatewaySettings, build_app
        from tests_stub import StubEngine
        assert "/venv/" in asyncllm.__file__, asyncllm.__file__
        settings = GatewaySettings(manage_engine=False)
        with TestClient(build_app(StubEngine(), settings)) as c:
            page = c.get("/")
            assert page.status_code == 200 and "vendor/marked.umd.js" in page.text, page.text[:200]
            js = c.get("/vendor/purify.min.js")
            assert js.status_code == 200 and "DOMPurify" in js.text
        print("ok")
        """
    )
    (run / "tests_stub.py").write_text(STUB_ENGINE)
    r = subprocess.run(
        [str(py), "-c", check], cwd=run, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    r = subprocess.run(
        [str(exe), "bench", "--help"], cwd=run, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "serving" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        [str(exe), "bench", "serving", "--help"],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "--url" in r.stdout, r.stdout + r.stderr


# The least an app needs from an engine to serve the page (the gateway reads these at start).
STUB_ENGINE = """
from types import SimpleNamespace


class StubEngine:
    model_config = SimpleNamespace(served_model_name="stub", max_model_len=64)
    tokenizer = None

    def stats(self):
        return None

    def health(self):
        return True
"""
