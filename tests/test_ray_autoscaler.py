"""Ray's own autoscaler, for real: a head started with a fake multi-node autoscaling config
(`fake_multinode`, ../shared/RAY-NOTES.md) has room for one expert worker only. `serve --address`
joins it (token auth), the controller asks for a second worker under load, the autoscaler starts a
node for its placement group, the worker lands there and takes copies of the hottest experts; when
the load stops the worker is retired and the autoscaler removes the idle node. No request fails or
changes a token. Only the processes this test started are ended (by PID), never `ray stop`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from tests.gateway_server import ServerProcess, wait_for_line
from tests.helpers import greedy_tokens
from tests.ray_head import free_port, ray_head
from tests.test_elastic import LONG, PROMPTS, Streams, cli

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out

CONFIG = """
cluster_name: expertmesh-fake
max_workers: 2
idle_timeout_minutes: 0.2
upscaling_speed: 1.0
provider:
  type: fake_multinode
  gcs_address: "127.0.0.1:{port}"
  use_node_id_as_ip: true
  disable_node_updaters: true
  disable_launch_config_check: true
head_node_type: ray.head.default
available_node_types:
  ray.head.default:
    resources: {{CPU: 1}}
    max_workers: 0
    node_config: {{}}
  ray.worker.expert:
    resources: {{CPU: 1}}
    min_workers: 0
    max_workers: 2
    node_config: {{}}
auth: {{}}
file_mounts: {{}}
cluster_synced_files: []
file_mounts_sync_continuously: false
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands: []
worker_start_ray_commands: []
"""


def alive_nodes(env: dict, address: str) -> int:
    """Nodes the autoscaler reports active (the head included)."""
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", address],
                         capture_output=True, text=True, env=env, timeout=60).stdout
    # "Active:" then one line per node type: " <count> <node type>", e.g. " 1 ray.head.default"
    active = out.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in out else ""
    counts = [line.split()[0] for line in active.splitlines() if line.strip()]
    return sum(int(c) for c in counts if c.isdigit())


@pytest.mark.timeout(900)
def test_rays_autoscaler_adds_a_node_for_a_new_worker_and_removes_it_after(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "ck", seed=91, init_std=0.1, num_experts=8)
    tokens = LONG  # outlasts the decision, a node started by the autoscaler and the change
    expected = greedy_tokens(Engine.local(checkpoint), PROMPTS, tokens)
    port = free_port()
    config = tmp_path / "autoscaler.yaml"
    config.write_text(CONFIG.format(port=port))
    with ray_head(1, "--autoscaling-config", str(config), port=port,
                  env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as head:
        server = None
        try:
            server = ServerProcess("--model", str(checkpoint), "--address", head.address, "--workers", "1",
                                   "--kv-cache-memory", "64MiB", "--autoscale", "--min-workers", "1",
                                   "--max-workers", "2", "--scale-window", "1.5", "--scale-up-busy", "0.01",
                                   "--scale-down-busy", "0.005", "--scale-down-delay", "3",
                                   "--placement-timeout", "180", startup_timeout=300)
            assert alive_nodes(head.env, head.address) == 1
            streams = Streams(server.target, tokens)
            wait_for_line(server, "controller: scale up", 120)
            wait_for_line(server, "plan change (autoscale up)", 240)  # the autoscaler had to start a node
            streams.mid_flight()  # the new epoch went live under every stream
            assert streams.join() == expected  # the controller scaled while they ran: not one token different
            placement = cli(server, "info")
            assert len(placement["workers"]) == 2
            # the head has room for one worker: two nodes means the autoscaler started one for the new worker
            assert len({w["node"] for w in placement["workers"]}) == 2
            assert all(w["experts"] for w in placement["workers"])
            wait_for_line(server, "controller: scale down", 120)
            deadline = time.monotonic() + 240  # retired, then the idle node goes (idle timeout 0.2 min)
            while alive_nodes(head.env, head.address) != 1:
                assert time.monotonic() < deadline, "the autoscaler did not remove the idle node"
                time.sleep(2)
            assert len(cli(server, "info")["workers"]) == 1
        finally:
            if server is not None:
                assert server.stop() == 0, "".join(server.lines[-30:])
