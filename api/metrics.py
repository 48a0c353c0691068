"""Prometheus metrics of a server (serve --metrics-port), in a registry of its own.

Names and units follow Prometheus' conventions (expertmesh_*_seconds, counters end in _total and
only counters do). What changes with every step or request is counted where it happens
(histograms, counters); what is a level right now (queue, running sequences, KV blocks, workers,
replicas) is read when Prometheus scrapes. The serving metrics carry a model_name label (the first
--served-model-name), as vLLM's do; process metrics (CPU, memory, open files) come with them.
Per-expert series: rows and replicas per (layer, expert) only with --metrics-per-expert (for Mixtral
8x7B, 256 series each); by default rows per (worker, layer).
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from expertmesh.router.loop_histograms import COUNTERS, HISTOGRAMS

log = logging.getLogger("expertmesh.metrics")
AUTOSCALER_ACTIONS = ("scale up", "scale down", "rebalance", "error")  # cluster/controller.py's


class Metrics:
    def __init__(self, model_name: str = "", per_expert: bool = False):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.per_expert = per_expert
        model = ["model_name"]

        def histogram(name, doc, buckets):
            return Histogram(name, doc, model, buckets=buckets, registry=r).labels(model_name)

        def of_model(kind, name, doc):  # a counter or gauge with the model_name label, bound
            return kind(name, doc, model, registry=r).labels(model_name)

        self.requests = Counter("expertmesh_requests", "Requests finished, by finish reason",
                                ["model_name", "finish_reason"], registry=r)
        self.api_requests = Counter("expertmesh_api_requests", "Calls answered by each door (grpc, http), by "
                                    "method or path and status code", ["door", "method", "code"], registry=r)
        self.model_name = model_name
        # router 0's loop histograms and counters (router/loop_histograms.py names them for every router)
        for attr, (name, doc, buckets) in HISTOGRAMS.items():
            setattr(self, attr, histogram(name, doc, buckets))
        for attr, (name, doc) in COUNTERS.items():
            setattr(self, attr, of_model(Counter, name, doc))
        self.queue = of_model(Gauge, "expertmesh_queue_requests", "Requests waiting to be scheduled")
        self.running = of_model(Gauge, "expertmesh_running_sequences", "Sequences in the running batch")
        self.kv_used = of_model(Gauge, "expertmesh_kv_blocks_used", "KV cache blocks in use")
        self.kv_blocks = of_model(Gauge, "expertmesh_kv_blocks", "KV cache blocks in the pool")
        self.kv_usage = of_model(Gauge, "expertmesh_kv_cache_usage_ratio", "Share of KV cache blocks in use (0-1)")
        self.workers = Gauge("expertmesh_workers", "Expert workers in the current epoch", registry=r)
        self.epoch_changes = Counter("expertmesh_epoch_changes", "Membership epochs formed", registry=r)
        self.recoveries = Counter("expertmesh_recoveries", "Lost workers recovered from", registry=r)
        self.autoscaler_decisions = Counter("expertmesh_autoscaler_decisions", "Changes the controller made, by action",
                                            ["action"], registry=r)
        for action in AUTOSCALER_ACTIONS:  # every series from the start, at 0 (rate() needs a first sample)
            self.autoscaler_decisions.labels(action=action)

    def counter_of(self, door: str):
        """count(method, code) for one door (api/gateway.py's CountReplies, api/http_api.py's
        CountResponses)."""
        return lambda method, code: self.api_requests.labels(door=door, method=method, code=code).inc()

    def finished(self, reason: str) -> None:
        self.requests.labels(model_name=self.model_name, finish_reason=reason).inc()

    def watch_serving(self, serving) -> None:
        """Levels of the serving engine, read at scrape time."""
        cache = serving.engine.cache
        self.queue.set_function(lambda: len(serving.scheduler.waiting))
        self.running.set_function(lambda: len(serving.scheduler.running))
        self.kv_used.set_function(lambda: cache.num_blocks - cache.free_blocks)
        self.kv_blocks.set_function(lambda: cache.num_blocks)
        self.kv_usage.set_function(lambda: (cache.num_blocks - cache.free_blocks) / cache.num_blocks)
        self.registry.register(_SchedulerCollector(serving, self.model_name))

    def watch_cluster(self, cluster) -> None:
        """The expert cluster's levels, read at scrape time: workers, rows and replicas per
        (layer, expert), busy seconds per worker."""
        self.workers.set_function(lambda: len(cluster.workers))
        self.registry.register(_ClusterCollector(cluster, self.per_expert))

    def watch_fleet(self, fleet) -> None:
        """The router fleet (api/router_fleet.py), read at scrape time: each router's streams and KV
        blocks in use, routers by state, streams continued on another router, routers lost."""
        self.registry.register(_FleetCollector(fleet, self.model_name))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on its own thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class _SchedulerCollector:
    """expertmesh_preemptions_total from the scheduler's own count, at scrape time."""

    def __init__(self, serving, model_name: str):
        self.serving, self.model_name = serving, model_name

    def collect(self):
        preemptions = CounterMetricFamily("expertmesh_preemptions", "Requests preempted (their KV freed, to be "
                                          "recomputed) when the pool ran short", labels=["model_name"])
        preemptions.add_metric([self.model_name], self.serving.scheduler.preemptions)
        yield preemptions


class _ClusterCollector:
    """Rows routed and copies per expert, busy seconds and weight bytes per worker, late replies, from
    the cluster at scrape time: expertmesh_worker_layer_rows_total (per worker and layer) always, and
    expertmesh_worker_memory_bytes where --worker-memory is set; expertmesh_expert_rows_total and
    expertmesh_expert_replicas (per layer and expert) when asked for."""

    def __init__(self, cluster, per_expert: bool):
        self.cluster, self.per_expert = cluster, per_expert

    def collect(self):
        busy = CounterMetricFamily("expertmesh_worker_busy_seconds", "Time each worker spent computing experts",
                                   labels=["worker"])
        held = GaugeMetricFamily("expertmesh_worker_weight_bytes", "Bytes of expert weights each worker holds "
                                 "(as held: int8 and scales when quantized)", labels=["worker"])
        by_layer = CounterMetricFamily("expertmesh_worker_layer_rows", "Rows each worker computed, per layer",
                                       labels=["worker", "layer"])
        try:
            for stats in self.cluster.stats():
                worker = str(stats["worker"])
                busy.add_metric([worker], stats["busy_s"])
                held.add_metric([worker], stats["weight_bytes"])
                layers: dict[str, int] = {}
                for pair, n in stats["rows_received"].items():
                    layer = pair.split(":", 1)[0]
                    layers[layer] = layers.get(layer, 0) + n
                for layer, n in sorted(layers.items(), key=lambda item: int(item[0])):
                    by_layer.add_metric([worker, layer], n)
        except Exception as exc:  # noqa: BLE001 - a worker being replaced: its figures next scrape
            log.warning("worker stats unavailable for /metrics: %s", exc)
        yield busy
        yield by_layer
        yield held
        yield CounterMetricFamily("expertmesh_late_replies", "Expert replies not waited for: late past their "
                                  "deadline, their rows went to other copies", value=self.cluster.replies.late)
        if self.cluster.budget is not None:
            yield GaugeMetricFamily("expertmesh_worker_memory_bytes", "Expert weight bytes one worker may hold "
                                    "(--worker-memory)", value=self.cluster.budget.worker_bytes)
        if self.per_expert:
            rows = CounterMetricFamily("expertmesh_expert_rows", "Rows routed to each (layer, expert)",
                                       labels=["layer", "expert"])
            replicas = GaugeMetricFamily("expertmesh_expert_replicas", "Copies of each (layer, expert)",
                                         labels=["layer", "expert"])
            counts, plan = self.cluster.expert_rows.clone(), self.cluster.plan
            for (layer, expert), holders in sorted(plan.holders.items()):
                labels = [str(layer), str(expert)]
                rows.add_metric(labels, float(counts[layer, expert]))
                replicas.add_metric(labels, len(holders))
            yield rows
            yield replicas


class _FleetCollector:
    def __init__(self, fleet, model_name: str):
        self.fleet, self.model_name = fleet, model_name

    def collect(self):
        routers = self.fleet.routers()
        streams = GaugeMetricFamily("expertmesh_router_streams", "The gateway's streams on each router",
                                    labels=["router"])
        kv = GaugeMetricFamily("expertmesh_router_kv_blocks_used", "KV cache blocks in use on each router",
                               labels=["router"])
        states = GaugeMetricFamily("expertmesh_routers", "Routers by state", labels=["state"])
        for r in routers:
            streams.add_metric([str(r["router"])], r["streams"])
            kv.add_metric([str(r["router"])], r["kv_blocks_total"] - r["kv_blocks_free"])
        for state in ("serving", "unhealthy", "lost"):
            states.add_metric([state], sum(r["state"] == state for r in routers))
        yield streams
        yield kv
        yield states
        yield CounterMetricFamily("expertmesh_streams_migrated", "Streams continued on another router after theirs "
                                  "was lost or drained", value=self.fleet.migrated)
        yield CounterMetricFamily("expertmesh_routers_lost", "Routers lost (dead or stalled) and fenced",
                                  value=len(self.fleet.lost))
        yield from self._router_actors()

    def _router_actors(self):
        """Each router actor's own histograms and counters (router/loop_histograms.py), read now,
        as expertmesh_router_* with a router label; router 0's are the families without it. A
        router that does not answer in time is left out of this scrape."""
        snapshots = self.fleet.router_histograms()
        labels = ["model_name", "router"]
        for attr, (name, doc, _) in HISTOGRAMS.items():
            family = HistogramMetricFamily(name.replace("expertmesh_", "expertmesh_router_", 1),
                                           f"{doc}, on each router actor", labels=labels)
            for router, snap in snapshots.items():
                h = snap["histograms"][attr]
                buckets = [(floatToGoString(bound), n) for bound, n in h["cumulative"]]  # as Histogram writes le
                family.add_metric([self.model_name, str(router)], buckets, h["sum"])
            yield family
        for attr, (name, doc) in COUNTERS.items():
            family = CounterMetricFamily(name.replace("expertmesh_", "expertmesh_router_", 1),
                                         f"{doc}, on each router actor", labels=labels)
            for router, snap in snapshots.items():
                family.add_metric([self.model_name, str(router)], snap["counters"][attr])
            yield family
        finished = CounterMetricFamily("expertmesh_router_requests", "Requests finished on each router actor, by "
                                       "finish reason", labels=[*labels, "finish_reason"])
        for router, snap in snapshots.items():
            for reason, n in sorted(snap["finished"].items()):
                finished.add_metric([self.model_name, str(router), reason], n)
        yield finished
