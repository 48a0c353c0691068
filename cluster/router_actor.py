"""A router of the fleet in a process of its own (a Ray actor): attention, the KV cache, the
scheduler and its own pair to every expert worker; one serving loop, on a thread of its own.

Gateways talk to it by Ray calls only: `submit` and `cancel` post work to the loop's inbox;
`poll` hands back what the loop produced for that gateway since its last poll, waiting up to a
moment when there is nothing (each gateway's one poller per router, which doubles as its heartbeat:
a router that does not answer a poll within the gateway's deadline is fenced). Every gateway has an
outbox of its own here; a gateway that stops polling for GATEWAY_SILENT_S is gone, and its streams
are cancelled (their clients lost their connection with it). Nothing here touches the engine but
the loop's thread (router/serving.py).

Routers are named actors (`router_name`, in ROUTER_NAMESPACE), so that a gateway in another
process (`expertmesh gateway --cluster`) finds them, and a serve process that comes back after its
predecessor's loss adopts them (cluster/rebuild.py; durable routers, on a cluster serve joined).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import ray
import torch

from expertmesh.cluster.worker_pool import NAMESPACE
from expertmesh.core import wire
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.heap import huge_pages_env
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.dispatcher import ExpertDispatcher, ReplyRecord
from expertmesh.router.engine import DTYPES, Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.loop_histograms import LoopHistograms
from expertmesh.router.model import RouterModel
from expertmesh.router.requests import InvalidRequest, ValidRequest
from expertmesh.router.serving import (
    FINISH_ERROR,
    EngineUnavailable,
    QueueFull,
    RequestOutput,
    ServingEngine,
)

log = logging.getLogger("expertmesh.router")
MAX_OUTPUTS_PER_POLL = 4096  # a poll's reply stays small however far the gateway fell behind
ROUTER_NAMESPACE = NAMESPACE
GATEWAY_SILENT_S = 10.0  # a gateway that has not polled for this long is gone: its streams are cancelled
GONE_KEPT_S = 600.0  # ...and what it was told is kept this long for it, in case it was only paused


def router_name(router: int) -> str:
    return f"router-{router}"


class Router:
    """Router `router` (>= 1; router 0 is the serve process's own) of model `model_dir`."""

    def __init__(self, router: int, model_dir: str, settings: ServingConfig, kv_blocks: int, gpus: bool):
        self.router = router
        self.settings = settings
        self.checkpoint = Checkpoint(model_dir)
        self.device = torch.device("cuda" if gpus else "cpu")
        self.backend = "nccl" if gpus else "gloo"
        dtype = DTYPES[settings.dtype]
        self.model = RouterModel.from_checkpoint(self.checkpoint, dtype, self.device, settings.quantize)
        self.cache = KVCache(self.checkpoint.config, kv_blocks, settings.block_size, dtype, self.device)
        self.tokenizer = load_tokenizer(model_dir, self.checkpoint.config.bos_token_id,
                                        self.checkpoint.config.eos_token_id)
        self.model_dir = model_dir
        self.serving: ServingEngine | None = None
        # gateway -> its (key, RequestOutput), in the order the loop produced them; under _ready
        self._outboxes: dict[str, deque] = {}
        self._polled: dict[str, float] = {}  # gateway -> when it last polled (monotonic); under _ready
        self._gone: dict[str, float] = {}  # gateway -> when its streams were ended for its silence; under _ready
        self._ready = threading.Condition()
        # Calls run on a pool of threads, so a cancel may overtake its submit: keys seen, under a lock
        self._keys = threading.Lock()
        self._submitted: dict[str, str] = {}  # key -> the gateway it came from
        self._cancelled_early: set[str] = set()
        self.epoch: int | None = None
        self.members: list[int] = []  # the current epoch's workers, in rank order
        self.store = None  # the store epochs' pairs form on, at _store_address
        self._store_address: tuple[str, int] | None = None  # a serve process that adopts us hosts a new one
        self._prepared: dict[int, tuple[list[int], list]] = {}  # epoch -> (its workers, this router's pairs)
        self.replies = ReplyRecord()  # reply times, across epochs
        self.changes = ChangeWaiter(settings.collective_timeout_s + 30)

    def describe(self) -> dict:
        """What a gateway of its own needs to serve this model: its files' contents, never paths
        (a gateway's pod need not mount the checkpoint)."""
        from expertmesh.core.chat import load_chat_template
        from expertmesh.core.tool_format import ToolFormat

        return {"model_dir": self.model_dir, "config": self.checkpoint.config, "tokenizer": self.tokenizer,
                "chat_template": load_chat_template(self.model_dir), "tool_format": ToolFormat.load(self.model_dir),
                "kv_tokens": self.cache.num_blocks * self.cache.block_size, "settings": self.settings}

    def where(self) -> dict:
        return {"router": self.router, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "job": ray.get_runtime_context().get_job_id(), "model_dir": self.model_dir}

    def prepare(self, store_host: str, store_port: int, epoch: int, workers: list[int]) -> None:
        """Form this router's pairs with `workers` (epoch `epoch`'s members, in rank order; each
        joins its end meanwhile), to be switched to by switch()."""
        timeout = self.settings.collective_timeout_s
        if self._store_address != (store_host, store_port):
            self.store = wire.open_store(store_host, store_port, False, timeout)
            self._store_address = (store_host, store_port)
        pairs = [wire.open_pair(self.store, epoch, w, wire.ROUTER_RANK, self.backend, timeout, self.router)
                 for w in workers]
        with self._keys:
            self._prepared[epoch] = (workers, pairs)

    def forget(self, epoch: int) -> None:
        """Epoch `epoch` never went live: let its pairs go."""
        with self._keys:
            _, pairs = self._prepared.pop(epoch, (None, []))
        for pair in pairs:
            wire.close_pair(pair, self.backend)

    def connect(self, store_host: str, store_port: int, epoch: int, workers: list[int], holders: dict) -> None:
        """Form the pairs with the current epoch's `workers` and start serving with placement
        `holders`."""
        self.prepare(store_host, store_port, epoch, workers)
        with self._keys:
            self.members, pairs = self._prepared.pop(epoch)
        engine = Engine(self.model, self._dispatcher(pairs, holders), self.cache, pingpong=self.settings.pingpong,
                        pingpong_min_tokens=self.settings.pingpong_min_tokens,
                        layer_threads=1 if self.device.type != "cuda" else None)
        self.epoch = epoch
        self.serving = ServingEngine(engine, self.tokenizer, self.settings, control=self.changes)
        self.serving.metrics = LoopHistograms()  # read by the gateway's metrics (histograms())
        # a step's outputs wake the gateway's poll once, together (one Ray reply per step, not per token)
        self.serving.outputs_done = self._flush

    def switch(self, epoch: int, holders: dict, deadline_s: float) -> None:
        """Apply the cluster's change to epoch `epoch` (prepared) at the loop's next step boundary;
        returns once applied."""
        with self._keys:
            workers, pairs = self._prepared.pop(epoch)

        def apply():  # on the loop's thread, between steps
            old = self.serving.engine.experts
            staying = set(workers)
            old.end_epoch(epoch, {i for i, w in enumerate(self.members) if w in staying})
            for pair in old.pairs:
                wire.close_pair(pair, self.backend)
            self.serving.engine.experts = self._dispatcher(pairs, holders)
            self.members, self.epoch = workers, epoch
            self.changes.applied()

        self.serving.call(apply).result(timeout=deadline_s)

    def use_plan(self, holders: dict, deadline_s: float) -> None:
        """Apply a new plan on the same pairs at the loop's next step boundary; returns once applied."""
        def apply():
            self.serving.engine.experts.use_plan(holders)
            self.changes.applied()

        self.serving.call(apply).result(timeout=deadline_s)

    def _dispatcher(self, pairs: list, holders: dict) -> ExpertDispatcher:
        return ExpertDispatcher(self.checkpoint.config, holders, len(pairs), self.device, pairs, self.backend,
                                keepalive_s=max(self.settings.collective_timeout_s / 4, 0.5), replies=self.replies,
                                on_lost=lambda lost: log.warning("router %d: workers %s lost on the data path",
                                                                 self.router, lost))

    def submit(self, key: str, valid: ValidRequest, client_id: str, gateway: str) -> None:
        """Queue a request under `gateway`'s key (unique across gateways); a refusal comes back
        through that gateway's poll() as its last output (error set), like every other end of a
        request."""
        with self._ready:
            self._polled.setdefault(gateway, time.monotonic())
        with self._keys:
            if key in self._cancelled_early:
                self._cancelled_early.discard(key)
                return
            self._submitted[key] = gateway
        try:
            if self.serving is None:
                raise EngineUnavailable(f"router {self.router} is not connected yet")
            self.serving.submit(valid, lambda out: self._put(key, out), client_id=client_id, key=key)
        except (QueueFull, EngineUnavailable, InvalidRequest) as exc:
            out = RequestOutput(client_id, [], "", finish_reason=FINISH_ERROR, error=str(exc),
                                retryable=not isinstance(exc, InvalidRequest))
            self._put(key, out)

    def cancel(self, key: str) -> None:
        with self._keys:
            if key not in self._submitted:
                self._cancelled_early.add(key)
                return
        self.serving.cancel(key)

    def poll(self, wait_s: float, gateway: str) -> tuple[list[tuple[str, RequestOutput]], dict]:
        """What the loop produced for `gateway` since its last poll (waiting up to wait_s for
        something), and the router's load now."""
        with self._ready:
            now = time.monotonic()
            self._polled[gateway] = now
            self._gone.pop(gateway, None)
            outbox = self._outboxes.setdefault(gateway, deque())
            if not outbox:
                self._ready.wait(timeout=wait_s)
            n = min(len(outbox), MAX_OUTPUTS_PER_POLL)
            outputs = [outbox.popleft() for _ in range(n)]
            silent = [g for g, t in self._polled.items() if g not in self._gone and now - t > GATEWAY_SILENT_S]
            for g in [g for g, t in self._gone.items() if now - t > GONE_KEPT_S]:
                del self._gone[g], self._polled[g], self._outboxes[g]
        for gone in silent:
            self._forget_gateway(gone)
        return outputs, self.load()

    def _forget_gateway(self, gateway: str) -> None:
        """`gateway` stopped polling (its clients lost their connection with it): end its streams.
        Should it come back (a pause, not a death), its next poll tells it so, stream by stream."""
        with self._keys:
            keys = [k for k, g in self._submitted.items() if g == gateway]
            for key in keys:
                del self._submitted[key]
        log.warning("router %d: gateway %s has not polled for %.0fs; ending its %d streams", self.router, gateway,
                    GATEWAY_SILENT_S, len(keys))
        why = f"its gateway did not poll router {self.router} for {GATEWAY_SILENT_S:.0f}s"
        with self._ready:
            self._gone[gateway] = time.monotonic()
            self._outboxes[gateway] = deque((k, RequestOutput("", [], "", finish_reason=FINISH_ERROR, error=why,
                                                              retryable=True)) for k in keys)
        for key in keys:
            self.serving.cancel(key)

    def _put(self, key: str, out: RequestOutput) -> None:
        """A sink: on the loop's thread (or a submit's, for a refusal, which wakes the poll at once)."""
        with self._keys:
            gateway = self._submitted.pop(key, None) if out.finish_reason is not None else self._submitted.get(key)
        if gateway is None:
            return  # its gateway is gone (the stream was ended for it)
        with self._ready:
            self._outboxes.setdefault(gateway, deque()).append((key, out))
            if self.serving is None or threading.current_thread() is not self.serving._thread:
                self._ready.notify_all()

    def _flush(self) -> None:
        with self._ready:
            if any(self._outboxes.values()):
                self._ready.notify_all()

    def histograms(self) -> dict:
        """This router's request and step histograms and counters (router/loop_histograms.py)."""
        return self.serving.metrics.snapshot() if self.serving is not None else {}

    def load(self) -> dict:
        """What gateways place requests by, and what `info` shows."""
        s = self.serving
        if s is None:
            return {"router": self.router, "pid": os.getpid(), "epoch": None, "healthy": False}
        return {"router": self.router, "pid": os.getpid(), "epoch": self.epoch, "healthy": s.healthy,
                "running": len(s.scheduler.running), "waiting": len(s.scheduler.waiting),
                "kv_blocks_free": self.cache.free_blocks, "kv_blocks_total": self.cache.num_blocks,
                "steps": s.steps}


class ChangeWaiter:
    """The serving loop's control plane in a router actor. The cluster finds lost workers itself
    (heartbeats) and sends every router its change; so a failed step only waits here for the next
    change to be applied (True: step again), or for `wait_s` (False: the loop fails the requests in
    flight, and the gateway continues them on another router)."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self._waiting: list[Future] = []
        self._lock = threading.Lock()

    def attach(self, loop) -> None:
        pass  # changes come through switch()/use_plan(), which post to the loop themselves

    def report_failure(self, exc: Exception | None) -> Future:
        future: Future = Future()
        with self._lock:
            self._waiting.append(future)
        timer = threading.Timer(self.wait_s, self._give_up, args=(future,))
        timer.daemon = True
        timer.start()
        return future

    def applied(self) -> None:
        """A change was applied (on the loop's thread): the steps waiting for one may run again."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for future in waiting:  # each future is taken from the list once, by applied() or _give_up()
            future.set_result(True)

    def _give_up(self, future: Future) -> None:
        with self._lock:
            if future not in self._waiting:
                return
            self._waiting.remove(future)
        future.set_result(False)


RemoteRouter = ray.remote(max_concurrency=8)(Router)  # polls, submits, cancels and loads side by side


@dataclass
class RouterHandle:
    router: int  # a stable name: router ids are never reused; 0 is the serve process's own
    actor: object
    pid: int = 0
    node_id: str = ""


def start_routers(cluster, ids: list[int], kv_blocks: int, resource: str | None = None) -> list[RouterHandle]:
    """Start routers `ids` as Ray actors (each with a GPU where workers have them, and one of the
    custom `resource` where named) and connect each to every worker of the cluster's current epoch."""
    from expertmesh.cluster.progress import progress

    settings = cluster.settings
    actors = [RemoteRouter.options(
        name=router_name(r), namespace=ROUTER_NAMESPACE,  # found by `expertmesh gateway --cluster`
        num_cpus=1, num_gpus=1 if cluster.gpus else 0, resources={resource: 1} if resource else None,
        runtime_env={"env_vars": {"RAY_worker_niceness": "0", **huge_pages_env()}},  # as workers: on the data path
        **({"lifetime": "detached"} if cluster.durable else {}),  # outlives serve: cluster/rebuild.py
    ).remote(r, cluster.model_dir, settings, kv_blocks, cluster.gpus) for r in ids]
    handles = [RouterHandle(r, a) for r, a in zip(ids, actors)]
    try:
        refs = [a.where.remote() for a in actors]
        deadline = time.monotonic() + settings.placement_timeout_s
        while True:  # a router Ray cannot place yet waits for Ray's autoscaler (KubeRay: a pod)
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=10)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {settings.placement_timeout_s:.0f}s for {len(pending)} router(s) to be "
                                   f"placed; the cluster has {ray.available_resources()} free")
            progress(f"waiting for {len(pending)} router(s) of {{CPU: 1{', GPU: 1' if cluster.gpus else ''}"
                     f"{', ' + resource + ': 1' if resource else ''}}} to be placed; `ray status` shows why")
        for h, where in zip(handles, ray.get(refs)):
            h.pid, h.node_id = where["pid"], where["node_id"]
        for h in handles:
            cluster.connect_router(h.router, h.actor)
            progress(f"router {h.router} (pid {h.pid}) connected to {len(cluster.workers)} workers")
    except BaseException:
        for h in handles:
            ray.kill(h.actor)
        raise
    return handles
