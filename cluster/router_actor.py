"""A router of the fleet in a process of its own (a Ray actor): attention, the KV cache, the
scheduler and its own pair to every expert worker; one serving loop, on a thread of its own.

The gateway talks to it by Ray calls only: `submit` and `cancel` post work to the loop's inbox;
`poll` hands back what the loop produced since the last poll, waiting up to a moment when there is
nothing (the gateway's one poller per router, which doubles as its heartbeat: a router that does
not answer a poll within the gateway's deadline is fenced). Nothing here touches the engine but
the loop's thread (router/serving.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass

import ray
import torch

from expertmesh.core import wire
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.heap import huge_pages_env
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.dispatcher import ExpertDispatcher, ReplyRecord
from expertmesh.router.engine import DTYPES, Engine
from expertmesh.router.kv_cache import KVCache
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
        self.serving: ServingEngine | None = None
        self._outbox: deque = deque()  # (key, RequestOutput), in the order the loop produced them
        self._ready = threading.Condition()
        # Calls run on a pool of threads, so a cancel may overtake its submit: keys seen, under a lock
        self._keys = threading.Lock()
        self._submitted: set[str] = set()
        self._cancelled_early: set[str] = set()
        self.epoch: int | None = None

    def where(self) -> dict:
        return {"router": self.router, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def connect(self, store_host: str, store_port: int, epoch: int, workers: list[int], holders: dict) -> None:
        """Form this router's pairs with `workers` (the epoch's members, in rank order; each joins
        its end meanwhile) and start serving with placement `holders`."""
        timeout = self.settings.collective_timeout_s
        store = wire.open_store(store_host, store_port, False, timeout)
        pairs = [wire.open_pair(store, epoch, w, wire.ROUTER_RANK, self.backend, timeout, self.router)
                 for w in workers]
        dispatcher = ExpertDispatcher(self.checkpoint.config, holders, len(workers), self.device, pairs, self.backend,
                                      keepalive_s=max(timeout / 4, 0.5), replies=ReplyRecord(),
                                      on_lost=lambda lost: log.warning("router %d: workers %s lost on the data path",
                                                                       self.router, lost))
        engine = Engine(self.model, dispatcher, self.cache, pingpong=self.settings.pingpong,
                        pingpong_min_tokens=self.settings.pingpong_min_tokens,
                        layer_threads=1 if not self.device.type == "cuda" else None)
        self.store, self.epoch = store, epoch
        self.serving = ServingEngine(engine, self.tokenizer, self.settings, own_thread=True)

    def submit(self, key: str, valid: ValidRequest, client_id: str) -> None:
        """Queue a request under the gateway's key; a refusal comes back through poll() as its
        last output (error set), like every other end of a request."""
        with self._keys:
            if key in self._cancelled_early:
                self._cancelled_early.discard(key)
                return
            self._submitted.add(key)
        try:
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

    def poll(self, wait_s: float) -> tuple[list[tuple[str, RequestOutput]], dict]:
        """What the loop produced since the last poll (waiting up to wait_s for something), and the
        router's load now."""
        with self._ready:
            if not self._outbox:
                self._ready.wait(timeout=wait_s)
            n = min(len(self._outbox), MAX_OUTPUTS_PER_POLL)
            outputs = [self._outbox.popleft() for _ in range(n)]
        return outputs, self.load()

    def _put(self, key: str, out: RequestOutput) -> None:
        if out.finish_reason is not None:
            with self._keys:
                self._submitted.discard(key)
        with self._ready:
            self._outbox.append((key, out))
            self._ready.notify()

    def load(self) -> dict:
        """What the gateway places requests by, and what `info` shows."""
        s = self.serving
        return {"router": self.router, "pid": os.getpid(), "epoch": self.epoch, "healthy": s.healthy,
                "running": len(s.scheduler.running), "waiting": len(s.scheduler.waiting),
                "kv_blocks_free": self.cache.free_blocks, "kv_blocks_total": self.cache.num_blocks,
                "steps": s.steps}


RemoteRouter = ray.remote(max_concurrency=8)(Router)  # polls, submits, cancels and loads side by side


@dataclass
class RouterHandle:
    router: int  # a stable name: router ids are never reused; 0 is the serve process's own
    actor: object
    pid: int = 0
    node_id: str = ""


def start_routers(cluster, ids: list[int], kv_blocks: int) -> list[RouterHandle]:
    """Start routers `ids` as Ray actors (each with a GPU where workers have them) and connect each
    to every worker of the cluster's current epoch."""
    from expertmesh.cluster.worker_pool import progress

    settings = cluster.settings
    actors = [RemoteRouter.options(
        num_cpus=1, num_gpus=1 if cluster.gpus else 0,
        runtime_env={"env_vars": {"RAY_worker_niceness": "0", **huge_pages_env()}},  # as workers: on the data path
    ).remote(r, cluster.model_dir, settings, kv_blocks, cluster.gpus) for r in ids]
    handles = [RouterHandle(r, a) for r, a in zip(ids, actors)]
    try:
        for h, where in zip(handles, ray.get([a.where.remote() for a in actors], timeout=settings.placement_timeout_s)):
            h.pid, h.node_id = where["pid"], where["node_id"]
        for h in handles:
            cluster.connect_router(h.router, h.actor)
            progress(f"router {h.router} (pid {h.pid}) connected to {len(cluster.workers)} workers")
    except BaseException:
        for h in handles:
            ray.kill(h.actor)
        raise
    return handles
