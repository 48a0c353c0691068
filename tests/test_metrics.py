"""Prometheus metrics of a real server with an expert worker: names and types by convention, the
request-level histograms and counters, a model_name label, process metrics, and the Grafana
dashboard in deploy/ querying only metrics the server exports (checked against a scrape parsed by
prometheus_client's own parser)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from expertmesh.workers.grouped_mlp import LayerExperts
from tests.gateway_server import ServerProcess, wait_for_line

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "expertmesh.json"
REQUESTS, TOKENS = 6, 5


def _families(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("metrics"), seed=5, num_experts=4)
    server = ServerProcess("--model", str(checkpoint), "--workers", "1", "--kv-cache-memory", "16MiB",
                           "--metrics-port", "0", "--served-model-name", "tiny-mixtral", "--worker-memory", "1GiB")
    try:
        server.metrics_url = wait_for_line(server, "expertmesh metrics on", 30).rsplit(" ", 1)[1].strip()
        server.http_url = wait_for_line(server, "expertmesh HTTP", 30).rsplit(" ", 1)[1].strip()
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def scrapes(server):
    """The families of a scrape before and one after REQUESTS requests of TOKENS tokens each (the
    server's own warm-up step comes before)."""
    url = server.metrics_url
    before = _families(url)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for i in range(REQUESTS):
            sampling = pb.SamplingParams(temperature=0, max_new_tokens=TOKENS, ignore_eos=True)
            list(stub.Generate(pb.GenerateRequest(token_ids=[1, 50 + i, 60 + i], sampling=sampling), timeout=60))
        middle = _families(url)
        # the same 40-token prompt twice: the second finds its two full blocks in the prefix cache
        for _ in range(2):
            list(stub.Generate(pb.GenerateRequest(token_ids=[1] + list(range(100, 139)), sampling=sampling),
                               timeout=60))
    return before, middle, _families(url)


def test_calls_count_by_door_method_and_status_code(server, scrapes):
    """Every call each door answers, counted with its final code: successes, refusals, unknown
    methods and paths (as one label value each: clients choose those names)."""
    before = _families(server.metrics_url)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(), timeout=60))  # no prompt
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        with pytest.raises(grpc.RpcError):
            channel.unary_unary("/no.Such/Method")(b"", timeout=60)
    for path, code in (("/v1/models", 200), ("/v1/nothing-here", 404)):
        try:
            assert urllib.request.urlopen(server.http_url.removesuffix("/v1") + path, timeout=30).status == code
        except urllib.error.HTTPError as exc:
            assert exc.code == code
    request = urllib.request.Request(server.http_url + "/completions", data=b"{not json",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=30)
    assert bad.value.code == 400
    after = _families(server.metrics_url)
    name = "expertmesh_api_requests_total"
    assert grew((before, after), name, door="grpc", method="/expertmesh.v1.Generation/Generate",
                code="INVALID_ARGUMENT") == 1
    assert grew((before, after), name, door="grpc", method="/expertmesh.v1.Generation/GetModelInfo", code="OK") == 1
    assert grew((before, after), name, door="grpc", method="unknown", code="UNIMPLEMENTED") == 1
    assert grew((before, after), name, door="http", method="/v1/models", code="200") == 1
    assert grew((before, after), name, door="http", method="unknown", code="404") == 1
    assert grew((before, after), name, door="http", method="/v1/completions", code="400") == 1
    # the first requests' successful streams counted as they ended
    assert value(before, name, door="grpc", method="/expertmesh.v1.Generation/Generate", code="OK") >= REQUESTS + 2


@pytest.fixture(scope="module")
def scrape(scrapes):
    return scrapes[1]


def test_prefix_cache_queries_and_hits_count_prompt_tokens(scrapes):
    _, middle, after = scrapes
    model = {"model_name": "tiny-mixtral"}
    assert grew(scrapes[:2], "expertmesh_prefix_cache_queries_total", **model) == REQUESTS * 3
    assert grew(scrapes[:2], "expertmesh_prefix_cache_hits_total", **model) == 0  # prompts under one block
    assert grew((middle, after), "expertmesh_prefix_cache_queries_total", **model) == 2 * 40
    assert grew((middle, after), "expertmesh_prefix_cache_hits_total", **model) == 32


def value(families, sample_name: str, **labels) -> float:
    """Sum of the samples called sample_name whose labels include `labels`."""
    return sum(s.value for f in families.values() for s in f.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def grew(scrapes, sample_name: str, **labels) -> float:
    """How much a sample grew over the first requests (or between the two scrapes given)."""
    before, after = scrapes[0], scrapes[1]
    return value(after, sample_name, **labels) - value(before, sample_name, **labels)


def test_names_and_types_follow_prometheus_conventions(scrape):
    for name, family in scrape.items():
        names = {s.name for s in family.samples}
        if family.type == "counter":
            assert all(n.endswith(("_total", "_created")) for n in names), (name, names)
        else:
            assert not any(n.endswith("_total") for n in names), (name, family.type, names)  # only counters


def test_request_histograms_token_counters_and_levels(scrapes, scrape):
    model = {"model_name": "tiny-mixtral"}
    for histogram in ("time_to_first_token", "request_queue", "request_prefill", "request_decode", "request_e2e"):
        assert grew(scrapes, f"expertmesh_{histogram}_seconds_count", **model) == REQUESTS, histogram
    assert grew(scrapes, "expertmesh_inter_token_latency_seconds_count", **model) == REQUESTS * (TOKENS - 1)
    assert grew(scrapes, "expertmesh_requests_total", finish_reason="length", **model) == REQUESTS
    assert grew(scrapes, "expertmesh_generation_tokens_total", **model) == REQUESTS * TOKENS
    assert grew(scrapes, "expertmesh_prompt_tokens_total", **model) == REQUESTS * 3
    assert value(scrape, "expertmesh_preemptions_total", **model) == 0
    assert value(scrape, "expertmesh_kv_blocks", **model) > 0
    assert value(scrape, "expertmesh_kv_cache_usage_ratio", **model) == 0  # idle: every block back
    # every token computed once (no prefix shared between these prompts): rows = tokens x top-2 x 2 layers
    assert grew(scrapes, "expertmesh_worker_layer_rows_total") == REQUESTS * (3 + TOKENS - 1) * 2 * 2
    assert value(scrape, "process_resident_memory_bytes") > 0
    # the one worker holds every expert: 2 layers x 4, each as LayerExperts counts it; --worker-memory's bytes
    one = LayerExperts.bytes_per_expert(64, 128, torch.float32, "none", "cpu")
    assert value(scrape, "expertmesh_worker_weight_bytes") == 2 * 4 * one
    assert value(scrape, "expertmesh_worker_memory_bytes") == 2**30
    assert "expertmesh_expert_rows" not in scrape  # per (layer, expert) only with --metrics-per-expert


def test_every_dashboard_panel_queries_a_metric_the_server_exports(scrape):
    exported = {s.name for family in scrape.values() for s in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:expertmesh|process)_[a-z0-9_]+)\b", target["expr"]))
            assert names, target["expr"]
            queried |= names
    assert queried - exported == set(), sorted(queried - exported)
    assert len(queried) >= 20  # the dashboard covers the core set, not a token panel
