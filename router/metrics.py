"""Prometheus metrics of a server (serve --metrics-port), in a registry of its own.

Names and units follow Prometheus' conventions (expertmesh_*_seconds, *_total). What changes with
every step or request is counted where it happens (histograms, counters); what is a level right
now (queue, running sequences, KV blocks, workers, replicas) is read when Prometheus scrapes.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("expertmesh.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("expertmesh_requests", "Requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("expertmesh_time_to_first_token_seconds", "From a request's arrival to its first "
                              "token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("expertmesh_inter_token_latency_seconds", "Between two tokens of a stream",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("expertmesh_step_seconds", "One model step", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tokens = Histogram("expertmesh_batch_tokens", "Tokens computed per step", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.queue = Gauge("expertmesh_queue_requests", "Requests waiting to be scheduled", registry=r)
        self.running = Gauge("expertmesh_running_sequences", "Sequences in the running batch", registry=r)
        self.kv_used = Gauge("expertmesh_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("expertmesh_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.workers = Gauge("expertmesh_workers", "Expert workers in the current epoch", registry=r)
        self.epoch_changes = Counter("expertmesh_epoch_changes", "Membership epochs formed", registry=r)
        self.recoveries = Counter("expertmesh_recoveries", "Lost workers recovered from", registry=r)
        self.autoscaler_decisions = Counter("expertmesh_autoscaler_decisions", "Changes the controller made, by action",
                                            ["action"], registry=r)

    def watch_serving(self, serving) -> None:
        """Levels of the serving engine, read at scrape time."""
        cache = serving.engine.cache
        self.queue.set_function(lambda: len(serving.scheduler.waiting))
        self.running.set_function(lambda: len(serving.scheduler.running))
        self.kv_used.set_function(lambda: cache.num_blocks - cache.free_blocks)
        self.kv_total.set_function(lambda: cache.num_blocks)

    def watch_cluster(self, cluster) -> None:
        """The expert cluster's levels, read at scrape time: workers, rows and replicas per
        (layer, expert), busy seconds per worker."""
        self.workers.set_function(lambda: len(cluster.workers))
        self.registry.register(_ClusterCollector(cluster))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on its own thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class _ClusterCollector:
    """expertmesh_expert_rows_total, expertmesh_expert_replicas and expertmesh_worker_busy_seconds_total
    from the cluster at scrape time."""

    def __init__(self, cluster):
        self.cluster = cluster

    def collect(self):
        rows = CounterMetricFamily("expertmesh_expert_rows", "Rows routed to each (layer, expert)",
                                   labels=["layer", "expert"])
        replicas = GaugeMetricFamily("expertmesh_expert_replicas", "Copies of each (layer, expert)",
                                     labels=["layer", "expert"])
        counts, plan = self.cluster.expert_rows.clone(), self.cluster.plan
        for (layer, expert), holders in sorted(plan.holders.items()):
            labels = [str(layer), str(expert)]
            rows.add_metric(labels, float(counts[layer, expert]))
            replicas.add_metric(labels, len(holders))
        busy = CounterMetricFamily("expertmesh_worker_busy_seconds", "Time each worker spent computing experts",
                                   labels=["worker"])
        try:
            for stats in self.cluster.stats():
                busy.add_metric([str(stats["worker"])], stats["busy_s"])
        except Exception as exc:  # noqa: BLE001 - a worker being replaced: its busy time next scrape
            log.warning("worker stats unavailable for /metrics: %s", exc)
        yield rows
        yield replicas
        yield busy
