"""The committed gRPC stubs are what the .proto generates (no stale stubs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"]


def test_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "protos/expertmesh/v1/generation.proto"], cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "protos" / "expertmesh" / "v1" / name).read_text()
        committed = (ROOT / "protos" / "expertmesh" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"
