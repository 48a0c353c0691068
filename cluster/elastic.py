"""The elastic expert cluster: workers and placement that change while requests stream.

Membership epochs (core/wire.py): the router and the workers of one epoch talk over that epoch's
group. Every change that adds or removes a worker forms the next epoch's group in the background
while the current one serves, then switches at a step boundary (OP_SWITCH to the workers that stay,
OP_SHUTDOWN to those that leave). A change of replicas among the same workers needs no new epoch:
the new holders load their copies first, the router's plan switches at a step boundary, and copies
that are no longer named are dropped after it.

A worker that dies (or stalls past --collective-timeout) fails the step in flight. The serving
loop then calls `recover`: the workers that do not answer are killed, their experts go to the
replicas that survive or are loaded on the survivors, the next epoch forms without them, and the
same step runs again from its inputs: its KV writes are idempotent and nothing was sampled yet, so
every stream goes on with exactly the tokens it would have had. A replacement worker is then
started in the background to restore the configured worker count.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch

from expertmesh.cluster.placement import PlacementError, PlacementPlan
from expertmesh.cluster.worker_pool import (
    WorkerHandle,
    ensure_ray,
    free_port,
    progress,
    start_workers,
    stop_worker,
    unresponsive,
    use_gpus,
)
from expertmesh.core import wire
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import DEFAULTS, ServingConfig
from expertmesh.router.dispatcher import ExpertDispatcher
from expertmesh.router.engine import DTYPES, Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.model import RouterModel

log = logging.getLogger("expertmesh.cluster")
LIVENESS_TIMEOUT_S = 5.0  # a worker that does not answer a control call this long is lost


class ChangeInterrupted(RuntimeError):
    """A worker was lost while a planned change was being prepared; the change was not applied."""


class ExpertCluster:
    """Workers placed, weights loaded, epoch 0 formed, serve loops running; `engine` generates."""

    def __init__(self, model_dir, num_workers: int, plan: PlacementPlan | None = None,
                 replicas: str | None = None, address: str | None = None,
                 settings: ServingConfig = DEFAULTS, kv_blocks: int = 512):
        self.owns_ray = ensure_ray(address)
        self.model_dir = str(model_dir)
        self.settings = settings
        self.checkpoint = Checkpoint(model_dir)
        config = self.checkpoint.config
        plan = plan or PlacementPlan.spread(num_workers, config.num_layers, config.num_experts)
        if replicas:
            plan = plan.with_replicas(replicas)
        if (plan.num_workers, plan.num_layers, plan.num_experts) != (num_workers, config.num_layers,
                                                                     config.num_experts):
            raise PlacementError(f"placement plan is for {plan.num_workers} workers, {plan.num_layers} "
                                 f"layers, {plan.num_experts} experts; the run has {num_workers} workers "
                                 f"and the model {config.num_layers} layers, {config.num_experts} experts")
        plan.validate()
        self.plan = plan
        self.target_workers = num_workers  # what recovery restores
        # "auto": GPU workers (and NCCL) when this router process has a GPU, else CPU and gloo. GPU
        # bundles that the cluster lacks make Ray's autoscaler add GPU nodes (KubeRay: GPU pods).
        self.gpus = use_gpus(settings.device)
        self.backend = "nccl" if self.gpus else "gloo"
        self.device = torch.device("cuda" if self.gpus else "cpu")
        self._next_worker, self._next_epoch = num_workers, 1
        self._change_lock = threading.Lock()  # one planned change at a time
        self._membership = threading.RLock()  # recovery, and the switch of a planned change
        self._old_groups: list = []  # earlier epochs' groups: let go only when the cluster stops
        self.recoveries = 0
        self.epoch = 0
        self._stopping = threading.Event()  # shutdown: no change may start a worker any more
        self.metrics = None  # router/metrics.py's Metrics, when the server exports them
        self.expert_rows = torch.zeros(config.num_layers, config.num_experts, dtype=torch.int64)  # (L, E)
        self._restorer: threading.Thread | None = None
        self.workers = start_workers(list(range(num_workers)), {w: plan.worker_pairs(w) for w in range(num_workers)},
                                     self.model_dir, settings, self.gpus)
        try:
            self.store_host = ray.util.get_node_ip_address()
            self.store_port = free_port(self.store_host)
            self.store = wire.open_store(self.store_host, self.store_port, True, settings.collective_timeout_s)
            group = self._form_epoch(0, self.workers)
        except BaseException:
            for h in self.workers:
                stop_worker(h)
            raise
        self.worker_bytes = ray.get([h.actor.nbytes.remote() for h in self.workers])
        dtype = DTYPES[settings.dtype]
        model = RouterModel.from_checkpoint(self.checkpoint, dtype, self.device)  # attention on the GPU too
        cache = KVCache(config, kv_blocks, settings.block_size, dtype, self.device)
        here = ray.get_runtime_context().get_node_id()
        local = any(h.node_id == here for h in self.workers)
        # CPU workers on this node share its cores with the router (see Engine.layer_threads).
        self.engine = Engine(model, self._dispatcher(group, plan), cache, pingpong=settings.pingpong,
                             pingpong_min_tokens=settings.pingpong_min_tokens,
                             layer_threads=1 if local and not self.gpus else None)
        self.engine.recover = self.recover

    # ---- epochs ------------------------------------------------------------------------------

    @property
    def dispatcher(self) -> ExpertDispatcher:
        return self.engine.experts

    def _dispatcher(self, group, plan: PlacementPlan) -> ExpertDispatcher:
        return ExpertDispatcher(self.checkpoint.config, plan.holders, plan.num_workers, self.device, group,
                                self.backend, keepalive_s=max(self.settings.collective_timeout_s / 4, 0.5),
                                expert_rows=self.expert_rows)

    def _form_epoch(self, epoch: int, members: list[WorkerHandle]):
        """Form epoch `epoch`'s group: router rank 0, members ranks 1.. in order; starts the serve
        loops of members that have none. Returns the router's member of the group."""
        world, timeout = len(members) + 1, self.settings.collective_timeout_s
        joins = [h.actor.join_epoch.remote(epoch, rank, world, self.store_host, self.store_port, self.backend,
                                           timeout) for rank, h in enumerate(members, start=1)]
        with ThreadPoolExecutor(1) as pool:  # rank 0 joins while the workers do
            mine = pool.submit(wire.open_group, self.store, epoch, wire.ROUTER_RANK, world, self.backend, timeout)
            ray.get(joins, timeout=timeout + 30)
            group = mine.result(timeout=timeout + 30)
        for h in members:  # new workers, and any whose loop has ended (it gave up on a lost epoch)
            if h.serving is None or ray.wait([h.serving], timeout=0)[0]:
                h.serving = h.actor.serve.remote(epoch, timeout)
        return group

    def _switch(self, epoch: int, group, plan: PlacementPlan, members: list[WorkerHandle]) -> None:
        """At a step boundary: the current epoch's workers that stay move to `epoch`, the others
        leave; the router sends the next step's rows by the new plan."""
        old = self.engine.experts
        staying = {h.worker for h in members}
        old.end_epoch(epoch, {i for i, h in enumerate(self.workers) if h.worker in staying})
        if self.backend == "nccl":  # abort its communicators: a destroy could hang on a lost peer
            wire.close_group(old.group, self.backend)
        else:  # gloo: its sockets go when the process does (a pending receive on a lost peer stays)
            self._old_groups.append(old.group)
        self.engine.experts = self._dispatcher(group, plan)
        self.plan, self.workers, self.epoch = plan, members, epoch
        if self.metrics is not None:
            self.metrics.epoch_changes.inc()

    def _allocate_epoch(self) -> int:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return epoch

    # ---- recovery (the serving loop's thread, after a failed step) ----------------------------

    def recover(self, exc: Exception | None) -> bool:
        """Form the next epoch without the workers that are gone; True when the step may run again
        (exc None: the serving loop asks again after a recovery that failed)."""
        with self._membership:
            start = time.monotonic()
            try:
                lost = unresponsive(self.workers, LIVENESS_TIMEOUT_S)
                for h in lost:
                    stop_worker(h)  # a stopped (SIGSTOP) one too: it must never come back into an epoch
                survivors, fresh, plan = [h for h in self.workers if h not in lost], [], self.plan
                if survivors:
                    for i in sorted((self.workers.index(h) for h in lost), reverse=True):
                        plan = plan.without_worker(i)  # its experts: surviving copies, else the least loaded
                else:  # nobody left: a new worker holds everything (Ray may need a node for it)
                    plan = PlacementPlan.spread(1, plan.num_layers, plan.num_experts)
                    survivors = fresh = self._start([self._new_id()], plan)
                index_old = {h.worker: i for i, h in enumerate(self.workers)}
                loads, _ = plan.moves_from(self.plan, {i: index_old[h.worker] for i, h in enumerate(survivors)
                                                       if h.worker in index_old})
                ray.get([h.actor.load.remote(loads[i]) for i, h in enumerate(survivors) if loads[i] and h not in fresh])
                epoch = self._allocate_epoch()
                group = self._form_epoch(epoch, survivors)
                self._switch(epoch, group, plan, survivors)
            except Exception:  # noqa: BLE001 - recovery itself failed: the requests in flight fail
                log.exception("recovery failed")
                return False
            self.recoveries += 1
            if self.metrics is not None:
                self.metrics.recoveries.inc()
            names = ", ".join(f"worker {h.worker} (pid {h.pid})" for h in lost) or "no worker"
            why = type(exc).__name__ if exc is not None else "retrying an earlier recovery"
            progress(f"recovery: lost {names} ({why}); epoch {epoch} with {len(survivors)} "
                     f"workers in {time.monotonic() - start:.2f}s; the interrupted step runs again")
        restoring = self._restorer is not None and self._restorer.is_alive()
        if len(self.workers) < self.target_workers and not self._stopping.is_set() and not restoring:
            self._restorer = threading.Thread(target=self._restore, name="expertmesh-restore", daemon=True)
            self._restorer.start()
        return True

    def _restore(self) -> None:
        """Bring the worker count back to the configured one (Ray may need a new node for it)."""
        try:
            self.scale_workers(self.target_workers, reason="replacing lost workers")
        except Exception as exc:  # noqa: BLE001 - serving goes on with fewer workers
            log.warning("could not restore %d workers: %s", self.target_workers, exc)
            progress(f"could not restore {self.target_workers} workers yet: {exc}")

    # ---- planned changes (any thread but the serving loop's) ----------------------------------

    def _new_id(self) -> int:
        worker, self._next_worker = self._next_worker, self._next_worker + 1
        return worker

    def _start(self, ids: list[int], plan: PlacementPlan, first: int = 0) -> list[WorkerHandle]:
        if self._stopping.is_set():
            raise ChangeInterrupted("the cluster is stopping")
        return start_workers(ids, {w: plan.worker_pairs(first + i) for i, w in enumerate(ids)}, self.model_dir,
                             self.settings, self.gpus, cancel=self._stopping)

    def _reconfigure(self, plan: PlacementPlan, keep: list[WorkerHandle], add: int, reason: str) -> None:
        """Change to `plan`, whose workers are `keep` (current workers, in order) then `add` new ones."""
        plan.validate()
        with self._change_lock:
            start = time.monotonic()
            old_epoch, old_plan, old_workers = self.epoch, self.plan, list(self.workers)
            index_old = {h.worker: i for i, h in enumerate(old_workers)}
            fresh = self._start([self._new_id() for _ in range(add)], plan, first=len(keep)) if add else []
            members = keep + fresh
            loads, drops = plan.moves_from(old_plan, {i: index_old[h.worker] for i, h in enumerate(keep)})
            try:
                ray.get([h.actor.load.remote(loads[i]) for i, h in enumerate(keep) if loads[i]])
                new_epoch = len(members) != len(old_workers) or bool(fresh)
                epoch = self._allocate_epoch() if new_epoch else old_epoch
                group = self._form_epoch(epoch, members) if new_epoch else None

                def switch():
                    with self._membership:
                        if self._stopping.is_set():
                            raise ChangeInterrupted("the cluster is stopping")
                        if self.epoch != old_epoch:
                            raise ChangeInterrupted("a worker was lost meanwhile; ask again")
                        if new_epoch:
                            self._switch(epoch, group, plan, members)
                        else:
                            self.engine.experts.use_plan(plan.holders)
                            self.plan = plan

                self.engine.run_between_steps(switch)
            except BaseException:
                for h in fresh:
                    stop_worker(h)
                raise
            ray.get([h.actor.drop.remote(drops[i]) for i, h in enumerate(keep) if drops[i]])
            leaving = [h for h in old_workers if h.worker not in {m.worker for m in members}]
            if leaving:
                ray.wait([h.serving for h in leaving], num_returns=len(leaving), timeout=10)
            for h in leaving:
                stop_worker(h)
            moved = sum(len(v) for v in loads.values())
            what = f"epoch {old_epoch} -> {epoch}" if new_epoch else f"epoch {epoch}"
            progress(f"plan change ({reason}): {what}, {len(members)} workers, {moved} expert copies loaded, "
                     f"{sum(len(v) for v in drops.values())} dropped, in {time.monotonic() - start:.2f}s")

    def apply_plan(self, plan: PlacementPlan, reason: str) -> PlacementPlan:
        """Change to `plan` on the current workers (the controller's rebalance)."""
        if plan.num_workers != len(self.workers):
            raise PlacementError(f"the plan is for {plan.num_workers} workers; the cluster has {len(self.workers)}")
        self._reconfigure(plan, list(self.workers), 0, reason)
        return self.plan

    def load_sample(self) -> dict:
        """Cumulative load now: rows per (layer, expert) and busy seconds per worker id; the
        controller takes differences of two samples."""
        rows = self.expert_rows.clone()
        busy = {}
        for stats in self.stats():
            busy[stats["worker"]] = stats["busy_s"]
        return {"time": time.monotonic(), "busy": busy,
                "rows": {(l, e): int(rows[l, e]) for l in range(rows.shape[0]) for e in range(rows.shape[1])}}

    def scale_replicas(self, spec: str) -> PlacementPlan:
        """Extra copies exactly as SPEC says ('' removes them all); returns once the plan is live."""
        plan = self.plan.with_replica_spec(spec)
        self._reconfigure(plan, list(self.workers), 0, f"replicas {spec!r}")
        return self.plan

    def scale_workers(self, count: int, reason: str | None = None) -> PlacementPlan:
        """Grow or shrink to `count` workers; returns once the new epoch is live."""
        if count < 1:
            raise PlacementError("at least one worker is needed (use --workers 0 at start for none)")
        self.target_workers = count
        with self._membership:
            plan, keep = self.plan, list(self.workers)
        add = max(count - len(keep), 0)
        for _ in range(add):
            plan = plan.with_new_worker()
        while len(keep) > count:
            plan = plan.without_worker(len(keep) - 1)
            keep.pop()
        if add or len(keep) != len(self.workers):
            self._reconfigure(plan, keep, add, reason or f"workers {len(self.workers)} -> {count}")
        return self.plan

    # ---- what operators see --------------------------------------------------------------------

    def placement(self) -> dict:
        """The live placement: epoch, and per worker its id, node, pid and experts."""
        with self._membership:
            plan, workers, epoch = self.plan, list(self.workers), self.epoch
        refs = [h.actor.stats.remote() for h in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=LIVENESS_TIMEOUT_S)
        rows, busy = {}, {}
        for h, ref in zip(workers, refs):
            try:
                stats = ray.get(ref) if ref in ready else {}
            except Exception:  # noqa: BLE001 - a worker lost just now: recovery is on it
                stats = {}
            rows[h.worker], busy[h.worker] = stats.get("rows_received", {}), stats.get("busy_s", 0.0)
        return {"epoch": epoch, "recoveries": self.recoveries,
                "workers": [{"worker": h.worker, "node": h.node_id, "pid": h.pid,
                             "experts": [f"{l}:{e}" for l, e in plan.worker_pairs(i)],
                             "copies": {f"{l}:{e}": len(plan.holders[(l, e)]) for l, e in plan.worker_pairs(i)},
                             "rows": rows[h.worker], "busy_s": busy[h.worker]}
                            for i, h in enumerate(workers)]}

    def stats(self) -> list[dict]:
        return ray.get([h.actor.stats.remote() for h in self.workers], timeout=30)

    def shutdown(self) -> None:
        """Stop the serve loops, free the workers and (if ours) Ray itself."""
        self._stopping.set()
        if self._restorer is not None:  # a replacement being started: it gives up, then we go on
            self._restorer.join(timeout=60)
        with self._change_lock:  # no planned change is half done
            pass
        try:
            self.engine.experts.shutdown_workers()
            ray.wait([h.serving for h in self.workers if h.serving is not None], num_returns=len(self.workers),
                     timeout=30)
        except Exception as exc:  # noqa: BLE001 - a broken group is expected after a worker died
            log.warning("workers did not leave cleanly: %s", exc)
        finally:
            for h in self.workers:
                stop_worker(h)
            if self.owns_ray:
                ray.shutdown()

    def __enter__(self) -> "ExpertCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
