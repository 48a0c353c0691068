"""Expert workers spread over two Ray nodes (ray.cluster_utils.Cluster), same tokens as the reference."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from tests.helpers import greedy_tokens

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_workers_on_two_nodes_match_reference(two_nodes, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", seed=4, num_experts=4)
    prompts = [[1, 1014, 2936], [1, *range(200, 209)]]
    expected = greedy_tokens(Engine.local(path), prompts, 6)
    with ExpertCluster(path, num_workers=2, replicas="*:2x2") as cluster:
        nodes = {w["node_id"] for w in ray.get([h.actor.where.remote() for h in cluster.workers])}
        assert len(nodes) == 2, "the placement group should spread the workers over both nodes"
        assert greedy_tokens(cluster.engine, prompts, 6) == expected
