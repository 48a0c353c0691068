"""The replica controller: reads the load every window and changes the cluster, at most once per
window, by itself (serve --autoscale).

Each window it reads the rows routed to every (layer, expert) and every worker's busy time (the
fraction of the window its experts computed), then, in this order:
1. scale up: when the busiest worker has been busier than --scale-up-busy for two windows in a row
   and the cluster has fewer than --max-workers workers, add one (a placement-group request that
   Ray's autoscaler, or KubeRay, answers with a node); the planner then gives it copies of the
   hottest experts;
2. scale down: when every worker has been below --scale-down-busy for --scale-down-delay seconds and
   the cluster has more than --min-workers, retire one;
3. rebalance: otherwise, when the planner's plan for this load is at least 10% better balanced
   than the current one, apply it on the current workers.
Every decision is logged with its reason. A manual `expertmesh scale` pins the cluster until
`expertmesh scale --auto` hands it back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from expertmesh.cluster import planner
from expertmesh.cluster.progress import progress
from expertmesh.cluster.record import StaleRecord

log = logging.getLogger("expertmesh.controller")
SUSTAIN_WINDOWS = 2  # windows in a row above --scale-up-busy before a worker is added
REBALANCE_GAIN = 0.10  # a new plan must be this much better balanced to be worth its moves


@dataclass(frozen=True)
class AutoscaleSettings:
    min_workers: int
    max_workers: int
    window_s: float = 30.0  # the load window; GPUs: long enough for a steady rate, short to react
    scale_up_busy: float = 0.8  # a worker computing experts 80% of wall time is the bottleneck
    scale_down_busy: float = 0.2
    scale_down_delay_s: float = 300.0  # minutes of low load before a GPU is given back
    spare_slots: int = 1  # expert slots per worker per layer beyond an even share of the experts

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= --min-workers ({self.min_workers}) <= --max-workers ({self.max_workers})")
        if not 0 <= self.scale_down_busy < self.scale_up_busy <= 1:
            raise ValueError("need 0 <= --scale-down-busy < --scale-up-busy <= 1")
        if self.window_s <= 0 or self.scale_down_delay_s < 0:
            raise ValueError("--scale-window must be > 0 and --scale-down-delay >= 0")


class Controller:
    def __init__(self, cluster, settings: AutoscaleSettings):
        self.cluster = cluster
        self.settings = settings
        self.pinned = False  # a manual scale holds until `scale --auto`
        self.decisions: list[tuple[float, str, str]] = []  # (time, action, reason)
        self.errors = 0  # windows that failed (also counted as decisions "error" in the metrics)
        self._hot_windows = 0
        self._cool_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expertmesh-controller", daemon=True)

    def start(self) -> "Controller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)  # a change it asked for ends with the cluster's shutdown

    def _decide(self, action: str, reason: str) -> None:
        self.decisions.append((time.time(), action, reason))
        progress(f"controller: {action}: {reason}")
        if self.cluster.metrics is not None:
            self.cluster.metrics.autoscaler_decisions.labels(action=action).inc()

    def _run(self) -> None:
        """Every window: sample, decide. Any error (a lost worker's stats, a failed change) is logged
        and counted, and the next window samples afresh: the controller never stops deciding."""
        last, wait = None, 0.0
        while not self._stop.wait(wait):
            wait = self.settings.window_s
            try:
                now = self.cluster.load_sample()
                if last is not None:
                    self.step(last, now)
                    now = self.cluster.load_sample()  # a change's own time is not load
                last = now
            except Exception as exc:  # noqa: BLE001 - see above
                log.exception("controller step failed")
                self.errors += 1
                self._decide("error", f"{type(exc).__name__}: {exc}")
                last = None

    def step(self, before: dict, after: dict) -> str:
        """One window's decision from two load samples; returns the action taken."""
        s = self.settings
        seconds = max(after["time"] - before["time"], 1e-9)
        busy = [max(after["busy"].get(w, 0.0) - before["busy"].get(w, 0.0), 0.0) / seconds for w in after["busy"]]
        rows = {p: after["rows"][p] - before["rows"].get(p, 0) for p in after["rows"]}
        workers = len(self.cluster.workers)
        log.info("window of %.1fs: busiest worker %.1f%% busy, %d rows", seconds, 100 * max(busy, default=0.0),
                 sum(rows.values()))
        if self.pinned:
            return "pinned"
        top = max(busy) if busy else 0.0
        self._hot_windows = self._hot_windows + 1 if top > s.scale_up_busy else 0
        if top < s.scale_down_busy:
            self._cool_since = self._cool_since if self._cool_since is not None else after["time"]
        else:
            self._cool_since = None
        if self._hot_windows >= SUSTAIN_WINDOWS and workers < s.max_workers:
            self._hot_windows = 0
            self._decide("scale up", f"busiest worker {top:.0%} busy for {SUSTAIN_WINDOWS} windows > "
                         f"{s.scale_up_busy:.0%}: {workers} -> {workers + 1} workers")
            self.cluster.scale_workers(workers + 1, reason="autoscale up")
            self._rebalance(rows, "the new worker takes copies of the hottest experts", force=True)
            return "scale up"
        cool_for = after["time"] - self._cool_since if self._cool_since is not None else 0.0
        if cool_for >= s.scale_down_delay_s and workers > s.min_workers:
            self._cool_since = None
            self._decide("scale down", f"every worker below {s.scale_down_busy:.0%} busy for {cool_for:.0f}s: "
                         f"{workers} -> {workers - 1} workers")
            self.cluster.scale_workers(workers - 1, reason="autoscale down")
            return "scale down"
        if sum(rows.values()) > 0 and self._rebalance(rows, "rebalance"):
            return "rebalance"
        return "none"

    def _rebalance(self, rows: dict, why: str, force: bool = False) -> bool:
        record = self.cluster.read()  # the plan and the version it is computed from
        current, copies = record.plan, self.cluster.settings.redundancy
        slots = -(-current.num_experts * min(copies, current.num_workers) // current.num_workers) \
            + self.settings.spare_slots
        budget = self.cluster.budget
        if budget is not None:  # --worker-memory: a layer's slots are a worker's room over the layers
            slots = min(slots, budget.experts // current.num_layers)
            copies = min(copies, slots * current.num_workers // current.num_experts)
            if copies < 1:  # no even share fits a layer: leave the plan as it is
                return False
        new = planner.plan(rows, current, slots, copies)
        before, after = planner.balance(current, rows), planner.balance(new, rows)
        if new.holders == current.holders or not (force or after < before * (1 - REBALANCE_GAIN)):
            return False
        try:
            self.cluster.apply_plan(new, reason="autoscale rebalance", based_on=record.version)
        except StaleRecord as exc:  # a recovery or a manual change came first: the next window decides again
            progress(f"controller: rebalance not applied: {exc}")
            return False
        self._decide("rebalance", f"{why}: balance {before:.2f} -> {after:.2f} (max/mean worker load), "
                     f"{planner.moves(current, new)} copies loaded")
        return True
