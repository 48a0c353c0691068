"""Admin.Scale as an attacker (or a typo) would call it: any count of workers or routers, any replica
spec. Counts past MAX_SCALE are refused by name at once (before, a count of four billion had the
driver create placement groups until it ran out of memory); the others are applied or refused with
a client's code, and the server keeps serving with the workers it had."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertmesh.api.admin_service import MAX_SCALE
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("admin"), seed=8, num_experts=4)
    proc = ServerProcess("--model", str(path), "--workers", "1", "--max-seqs", "4")
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-30:])


@pytest.fixture(scope="module")
def admin(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.AdminStub(channel), pb_grpc.GenerationStub(channel)


counts = st.one_of(st.just(0), st.integers(MAX_SCALE + 1, 2**32 - 1))
specs = st.one_of(st.text(max_size=40), st.from_regex(r"[*0-9]{1,3}:[0-9]{1,10}(x[0-9]{1,10})?", fullmatch=True),
                  st.just(""))


@given(target=st.sampled_from(["workers", "routers"]), count=counts)
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_counts_out_of_range_are_refused_at_once(admin, target, count):
    stub, _ = admin
    with pytest.raises(grpc.RpcError) as refused:
        stub.Scale(pb.ScaleRequest(**{target: count}), timeout=30)
    assert refused.value.code() in CLIENT_ERRORS, refused.value
    if count > MAX_SCALE:
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_SCALE}" in refused.value.details()


@given(spec=specs)
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_replica_spec_is_applied_or_refused_with_a_client_error(admin, spec):
    stub, _ = admin
    try:
        placement = stub.Scale(pb.ScaleRequest(replicas=spec), timeout=120)
        assert len(placement.workers) == 1  # one worker: every copy past the first is refused, not made
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (spec, exc)
        assert len(exc.details()) <= 1000


def test_the_server_serves_with_its_worker_after_the_properties(admin):
    stub, generation = admin
    assert len(stub.GetPlacement(pb.GetPlacementRequest(), timeout=30).workers) == 1
    sampling = pb.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    chunks = list(generation.Generate(pb.GenerateRequest(token_ids=[1, 5, 6], sampling=sampling), timeout=60))
    assert sum(len(c.token_ids) for c in chunks) == 4
