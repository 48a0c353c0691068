"""The committed gRPC stubs describe the .proto (no stale stubs), and the runtime minimums in
pyproject.toml are what the stubs need.

Compared as descriptors and method paths, not bytes: a new grpcio-tools release changes the
generated text (version banners, formatting) without changing what it describes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from expertmesh.v1 import generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "expertmesh/v1/generation.proto"
STUBS = ROOT / "protos" / "expertmesh" / "v1"


def test_committed_descriptor_is_the_protos(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    out = tmp_path / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"),
                    f"--descriptor_set_out={out}", PROTO], check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc adds json names; the embedded descriptor leaves them out
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(generation_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "the stubs are stale: run `make protos`"
    assert committed.package == "expertmesh.v1" and committed.name == PROTO


def test_grpc_stub_serves_every_method_of_the_proto():
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    source = (STUBS / "generation_pb2_grpc.py").read_text()
    paths = set(re.findall(r"'(/expertmesh\.v1\.Generation/\w+)'", source))
    assert paths == {f"/expertmesh.v1.Generation/{m.name}" for m in service.methods}
    for method in service.methods:
        assert hasattr(generation_pb2_grpc.GenerationServicer, method.name)


def _minimum(requirement_name: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{requirement_name}\s*>=", d))
    return tuple(int(x) for x in spec.split(">=")[1].split(",")[0].strip().split("."))


def test_runtime_minimums_match_what_the_stubs_need():
    pb2 = (STUBS / "generation_pb2.py").read_text()
    major, minor, patch = map(int, re.search(
        r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2).groups())
    assert _minimum("protobuf") == (major, minor, patch), "pyproject's protobuf>= must be the stubs' runtime"
    grpc_needed = tuple(int(x) for x in re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                                                  (STUBS / "generation_pb2_grpc.py").read_text()).group(1).split("."))
    assert _minimum("grpcio") == grpc_needed, "pyproject's grpcio>= must be the stubs' GRPC_GENERATED_VERSION"
