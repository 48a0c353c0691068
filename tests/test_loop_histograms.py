"""A router actor's histograms (router/loop_histograms.py) against prometheus_client's own, which
serve's router 0 uses: the same observations give the same buckets, count and sum."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.utils import floatToGoString

from expertmesh.router.loop_histograms import HISTOGRAMS, LoopHistograms


def test_buckets_count_and_sum_equal_prometheus_clients_for_every_histogram():
    rng = random.Random(7)
    ours = LoopHistograms()
    for attr, (name, doc, bounds) in HISTOGRAMS.items():
        theirs = Histogram(name, doc, buckets=bounds, registry=CollectorRegistry())
        # on the bounds themselves (le is inclusive), between them, below the first, past the last
        values = [*bounds, *(b * 1.5 for b in bounds), 0.0, bounds[0] / 2, bounds[-1] * 10]
        values += [rng.uniform(0, bounds[-1] * 1.2) for _ in range(200)]
        for v in values:
            getattr(ours, attr).observe(v)
            theirs.observe(v)
        expected = {s.labels["le"]: s.value for s in theirs.collect()[0].samples if s.name.endswith("_bucket")}
        snap = ours.snapshot()["histograms"][attr]
        assert {floatToGoString(b): n for b, n in snap["cumulative"]} == expected, attr
        assert snap["cumulative"][-1][1] == len(values)
        assert abs(snap["sum"] - sum(values)) < 1e-9 * max(1.0, sum(values))


def test_counters_and_finish_reasons_are_plain_data():
    ours = LoopHistograms()
    ours.generation_tokens.inc()
    ours.generation_tokens.inc(4)
    ours.finished("length")
    ours.finished("stop")
    ours.finished("length")
    snap = ours.snapshot()
    assert snap["counters"]["generation_tokens"] == 5 and snap["counters"]["prompt_tokens"] == 0
    assert snap["finished"] == {"length": 2, "stop": 1}
