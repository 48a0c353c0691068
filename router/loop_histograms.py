"""The serving loop's request and step histograms: what one router measures of its own requests.

The serve process's router 0 observes into Prometheus objects (api/metrics.py); a router actor
(cluster/router_actor.py) observes into a `LoopHistograms` of its own, in its own process, and the
gateway reads a snapshot of it when Prometheus scrapes (api/metrics.py renders each router's under
`expertmesh_router_*`, labelled by router). Both take their names, help and buckets from HISTOGRAMS
and COUNTERS here. Only the loop's thread writes; a snapshot taken meanwhile may be one
observation behind in one field, never inconsistent in a bucket's order.
"""

from __future__ import annotations

import bisect
from collections import Counter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

# the loop's attribute -> (metric name, help, buckets)
HISTOGRAMS = {
    "ttft": ("expertmesh_time_to_first_token_seconds", "From a request's arrival to its first token",
             LATENCY_BUCKETS),
    "itl": ("expertmesh_inter_token_latency_seconds", "Between two tokens of a stream", LATENCY_BUCKETS),
    "queue_time": ("expertmesh_request_queue_seconds", "From a request's arrival to its first step", REQUEST_BUCKETS),
    "prefill_time": ("expertmesh_request_prefill_seconds", "From a request's first step to its first token",
                     REQUEST_BUCKETS),
    "decode_time": ("expertmesh_request_decode_seconds", "From a request's first token to its last",
                    REQUEST_BUCKETS),
    "e2e": ("expertmesh_request_e2e_seconds", "From a request's arrival to its end", REQUEST_BUCKETS),
    "step": ("expertmesh_step_seconds", "One model step", LATENCY_BUCKETS),
    "batch_tokens": ("expertmesh_batch_tokens", "Tokens computed per step", TOKEN_BUCKETS),
}
# the loop's attribute -> (counter name without _total, help)
COUNTERS = {
    "prompt_tokens": ("expertmesh_prompt_tokens", "Prompt tokens of finished requests"),
    "generation_tokens": ("expertmesh_generation_tokens", "Tokens generated"),
    "prefix_queries": ("expertmesh_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    "prefix_hits": ("expertmesh_prefix_cache_hits", "Prompt tokens found in the prefix cache"),
}


class Buckets:
    """A histogram: counts[i] of observations <= bounds[i] and above bounds[i - 1]; the last past
    every bound."""

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """{"cumulative": [(upper bound, observations <= it), ..., (inf, all)], "sum": ...}"""
        counts, total = list(self.counts), 0
        cumulative = []
        for bound, n in zip([*map(float, self.bounds), float("inf")], counts):
            total += n
            cumulative.append((bound, total))
        return {"cumulative": cumulative, "sum": self.sum}


class Tally:
    def __init__(self):
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LoopHistograms:
    """What a ServingEngine observes into (its `metrics`), in a router actor's process."""

    def __init__(self):
        for attr, (_, _, bounds) in HISTOGRAMS.items():
            setattr(self, attr, Buckets(bounds))
        for attr in COUNTERS:
            setattr(self, attr, Tally())
        self.finish_reasons: Counter = Counter()

    def finished(self, reason: str) -> None:
        self.finish_reasons[reason] += 1

    def snapshot(self) -> dict:
        """Plain data for a Ray reply: histograms and counters by their loop attribute, and the
        finished requests by reason."""
        return {"histograms": {attr: getattr(self, attr).snapshot() for attr in HISTOGRAMS},
                "counters": {attr: getattr(self, attr).value for attr in COUNTERS},
                "finished": dict(self.finish_reasons)}
