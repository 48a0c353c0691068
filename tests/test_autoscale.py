"""serve --autoscale in a real server on an embedded Ray: under load the controller adds a worker
(its own placement group), the streams keep exactly their tokens, the metrics endpoint counts what
happened, and when the load stops the worker is retired."""

from __future__ import annotations

import time

import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from tests.gateway_server import ServerProcess, scrape, total, wait_for_line
from tests.helpers import greedy_tokens
from tests.test_elastic import LONG, PROMPTS, Streams, cli

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("autoscale"), seed=81, init_std=0.1, num_experts=8)


def test_the_controller_scales_out_under_load_and_back_in_after(checkpoint):
    tokens = LONG  # long enough for several load windows and the change that follows them
    expected = greedy_tokens(Engine.local(checkpoint), PROMPTS, tokens)
    server = ServerProcess("--model", str(checkpoint), "--workers", "1", "--kv-cache-memory", "64MiB",
                           "--autoscale", "--min-workers", "1", "--max-workers", "2", "--scale-window", "1.5",
                           "--scale-up-busy", "0.01", "--scale-down-busy", "0.005", "--scale-down-delay", "3",
                           "--metrics-port", "0")
    try:
        metrics_url = wait_for_line(server, "expertmesh metrics on", 30).rsplit(" ", 1)[1].strip()
        streams = Streams(server.target, tokens)
        wait_for_line(server, "controller: scale up", 90)
        wait_for_line(server, "plan change (autoscale up)", 60)  # the new epoch is live
        streams.mid_flight()  # the new epoch went live under every stream
        assert streams.join() == expected  # the controller scaled while they ran: not one token different
        during = scrape(metrics_url)
        assert total(during, "expertmesh_requests_total") >= len(PROMPTS)
        assert total(during, "expertmesh_requests_total", finish_reason="length") >= len(PROMPTS)
        assert total(during, "expertmesh_time_to_first_token_seconds_count") >= len(PROMPTS)
        assert total(during, "expertmesh_inter_token_latency_seconds_count") >= len(PROMPTS) * (tokens - 1)
        assert total(during, "expertmesh_step_seconds_count") > 0 and total(during, "expertmesh_batch_tokens_sum") > 0
        assert total(during, "expertmesh_worker_layer_rows_total") > 0
        assert total(during, "expertmesh_worker_busy_seconds_total") > 0
        assert during["expertmesh_epoch_changes_total"] >= 1
        assert during['expertmesh_autoscaler_decisions_total{action="scale up"}'] >= 1
        assert total(during, "expertmesh_kv_blocks") > 0 and total(during, "expertmesh_kv_blocks_used") == 0
        wait_for_line(server, "controller: scale down", 60)
        deadline = time.monotonic() + 30
        while len(cli(server, "info")["workers"]) != 1:
            assert time.monotonic() < deadline, "the added worker was not retired"
            time.sleep(0.5)
        after = scrape(metrics_url)
        assert after["expertmesh_workers"] == 1
        assert after['expertmesh_autoscaler_decisions_total{action="scale down"}'] >= 1
        # A manual scale pins the placement: idle as it is, the controller leaves it alone...
        assert len(cli(server, "scale", "--workers", "2")["workers"]) == 2
        time.sleep(3 * 1.5 + 3)  # three windows and the scale-down delay
        assert len(cli(server, "info")["workers"]) == 2
        # ...until `scale --auto` hands it back: then the idle worker is retired again.
        cli(server, "scale", "--auto")
        deadline = time.monotonic() + 30
        while len(cli(server, "info")["workers"]) != 1:
            assert time.monotonic() < deadline, "the controller did not take the placement back"
            time.sleep(0.5)
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])
