"""The router controller: adds a router when requests queue up or the KV caches fill, and drains one
when they stay empty (serve --autoscale-routers; off by default).

Eight times a window it reads each serving router's waiting requests and share of KV blocks in use
(router 0's own, the others' as their last poll reported them), and at the end of the window:
1. scale up: when the routers' mean waiting requests reached --router-scale-up-waiting, or their
   mean KV use --router-scale-up-kv, two windows in a row, and there are fewer than --max-routers:
   start one (a Ray actor: one CPU, or a GPU, that Ray's autoscaler, or KubeRay, answers with a node);
2. scale down: when no request waited and no router's KV use passed --router-scale-down-kv for
   --scale-down-delay seconds, and there are more than --min-routers: drain the newest (its streams
   go on on the others).
Every decision is logged with its reason.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("expertmesh.controller")
SUSTAIN_WINDOWS = 2  # windows in a row of queueing or full caches before a router is added
SAMPLES_PER_WINDOW = 8


@dataclass(frozen=True)
class RouterScaling:
    min_routers: int
    max_routers: int
    window_s: float = 30.0
    scale_up_waiting: float = 4.0  # requests waiting per router, on average: the routers are the bottleneck
    scale_up_kv: float = 0.8  # KV blocks in use: new streams will soon wait for blocks
    scale_down_kv: float = 0.2
    scale_down_delay_s: float = 300.0  # a router's memory (and GPU) is slow to get back

    def __post_init__(self) -> None:
        if not 1 <= self.min_routers <= self.max_routers:
            raise ValueError(f"need 1 <= --min-routers ({self.min_routers}) <= --max-routers ({self.max_routers})")
        if not 0 <= self.scale_down_kv < self.scale_up_kv <= 1 or self.scale_up_waiting <= 0:
            raise ValueError("need 0 <= --router-scale-down-kv < --router-scale-up-kv <= 1 and "
                             "--router-scale-up-waiting > 0")
        if self.window_s <= 0 or self.scale_down_delay_s < 0:
            raise ValueError("--scale-window must be > 0 and --scale-down-delay >= 0")


class RouterController:
    def __init__(self, fleet, settings: RouterScaling):
        self.fleet = fleet
        self.settings = settings
        self.decisions: list[tuple[float, str, str]] = []  # (time, action, reason)
        self._hot_windows = 0
        self._cool_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expertmesh-router-controller", daemon=True)

    def start(self) -> "RouterController":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            samples = []
            for _ in range(SAMPLES_PER_WINDOW):
                if self._stop.wait(s.window_s / SAMPLES_PER_WINDOW):
                    return
                samples.append(self.fleet.load_sample())
            try:
                self.decide(samples, time.monotonic())
            except Exception:  # noqa: BLE001 - a failed change: logged, tried again next window
                log.exception("router scaling failed")

    def decide(self, samples: list[list[dict]], now: float) -> str | None:
        """samples: per sample, each serving router's {"waiting", "kv_used"}; -> the action taken."""
        s = self.settings
        routers = len(samples[-1])
        flat = [r for sample in samples for r in sample]
        waiting = sum(r["waiting"] for r in flat) / max(len(flat), 1)
        kv = sum(r["kv_used"] for r in flat) / max(len(flat), 1)
        hot = waiting >= s.scale_up_waiting or kv >= s.scale_up_kv
        cool = all(r["waiting"] == 0 and r["kv_used"] <= s.scale_down_kv for r in flat)
        self._hot_windows = self._hot_windows + 1 if hot else 0
        self._cool_since = (self._cool_since or now) if cool else None
        reason = f"{waiting:.1f} requests waiting and {kv:.0%} of KV blocks in use per router, on average"
        if self._hot_windows >= SUSTAIN_WINDOWS and routers < s.max_routers:
            return self._act("scale up", routers + 1, reason)
        if self._cool_since is not None and now - self._cool_since >= s.scale_down_delay_s and routers > s.min_routers:
            return self._act("scale down", routers - 1, f"idle for {now - self._cool_since:.0f}s ({reason})")
        return None

    def _act(self, action: str, routers: int, reason: str) -> str:
        log.warning("router controller: %s to %d routers: %s", action, routers, reason)
        self.fleet.scale(routers)
        self.decisions.append((time.monotonic(), action, reason))
        self._hot_windows, self._cool_since = 0, None
        return action
