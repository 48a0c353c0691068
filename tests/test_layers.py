"""The package's shape: one installed name, layers that import one way, no import cycle.

Layers, bottom to top (DESIGN.md): the API stubs (expertmesh.v1) and the bottom (expertmesh.core:
model format, math, wire protocol) import nothing of ours above them; the data path
(expertmesh.router, expertmesh.workers) imports only those; the control plane (expertmesh.cluster)
adds the data path; the front door (expertmesh.api: gRPC gateway, HTTP API, admin, metrics) adds
the control plane; the application (the top-level expertmesh modules: CLI, server, client) may import
everything. Imports inside functions count too: a lazy import that climbs is still a climb.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "expertmesh.core", "router": "expertmesh.router", "workers": "expertmesh.workers",
           "cluster": "expertmesh.cluster", "api": "expertmesh.api", "app": "expertmesh",
           "protos/expertmesh/v1": "expertmesh.v1"}
RANK = {"expertmesh.v1": 0, "expertmesh.core": 0, "expertmesh.router": 1, "expertmesh.workers": 1,
        "expertmesh.cluster": 2, "expertmesh.api": 3, "expertmesh": 4}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in RANK else "expertmesh"


def our_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_imports_never_climb_a_layer():
    modules = our_modules()
    assert len(modules) > 25, sorted(modules)
    climbs = []
    for name, path in modules.items():
        for target in imports_of(path, modules):
            same_package = layer_of(target) == layer_of(name)
            if not same_package and RANK[layer_of(target)] >= RANK[layer_of(name)]:
                climbs.append(f"{name} imports {target}")
    assert not climbs, "\n".join(climbs)


def external_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_bottom_and_model_math_know_nothing_of_ray_or_collectives():
    math = ("expertmesh.router.model", "expertmesh.router.attention", "expertmesh.router.engine",
            "expertmesh.router.scheduler", "expertmesh.router.serving")
    checked = 0
    for name, path in our_modules().items():
        if (name.startswith("expertmesh.core.") and name != "expertmesh.core.wire") or name in math:
            bad = {m for m in external_imports(path) if m == "ray" or m.startswith(("ray.", "torch.distributed"))}
            assert not bad, f"{name} imports {bad}"
            checked += 1
    assert checked > 10


def test_no_import_cycle():
    modules = our_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.timeout(600)
def test_the_wheel_installs_one_top_level_package(tmp_path):
    import shutil
    import tomllib

    source = tmp_path / "source"  # a copy: setuptools leaves build/ beside what it builds
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in {f.split("/")[0] for f in package_dirs.values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("expertmesh-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"expertmesh"}, top
    for module in ("expertmesh/cli.py", "expertmesh/core/config.py", "expertmesh/router/engine.py",
                   "expertmesh/workers/expert_worker.py", "expertmesh/cluster/bringup.py",
                   "expertmesh/api/http_api.py",
                   "expertmesh/v1/generation_pb2_grpc.py",
                   "expertmesh/core/cpu_kernels.c"):  # the C source, compiled where the package runs
        assert module in names, module


def test_the_image_copies_every_folder_the_package_is_built_from():
    import tomllib

    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for folder in {f.split("/")[0] for f in folders}:
        assert f"COPY --chown=ray:users {folder} ./{folder}" in dockerfile, folder
    assert set(FOLDERS) == set(folders), "tests/test_layers.py must know every folder of the package"
