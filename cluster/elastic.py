"""The elastic expert cluster: workers and placement that change while requests stream.

Who owns what (docs/architecture.md draws it):
- The serving loop's thread (router/serving.py) alone touches the engine and its expert path. The
  control plane prepares every change elsewhere and hands the loop a commit (`loop.call`), which the
  loop runs between two steps: switch to the next epoch's pairs, or to a new plan on the same pairs.
  With no loop attached there is no change.
- The placement record (cluster/record.py: version, epoch, plan, workers) is written only by the
  change runner (cluster/change_runner.py), whose one control thread runs every change of
  membership or placement in order: recoveries, planned changes (scale, rebalance), restores,
  routers joining. Everyone else reads versioned snapshots. Slow preparation that is not a change
  of the record (starting worker processes, waiting for Ray to place them) happens on the caller's
  thread, before the change is queued.
- The heartbeat monitor (cluster/health.py) only reports losses; this class fences the workers and
  asks the runner for a recovery. Standby workers are the pool's (cluster/standby.py).
- The record is checked against the world: every change is computed from what the workers report
  holding, and after every change (applied or abandoned) each worker drops what the record does not
  name, so an interrupted change is rolled back (not committed) or forward (committed).

Faults: a heartbeat monitor asks every worker for a sign of life every heartbeat_timeout_s / 8; one
that does not answer within heartbeat_timeout_s (SIGSTOPped, wedged) is fenced (killed), which turns
the stall into a death the data path sees at once. Each worker has a pair of its own with the router
(core/wire.py), so a death fails only that worker's messages. When every expert it held has a copy
elsewhere, the dispatcher sends its rows of the step in flight to those copies and the step goes on
(router/dispatcher.py); the loss is reported here, and the control thread forms the next epoch
without the lost worker in the background. When some expert has no other copy, the step fails: the
loop reports it and waits while the control thread loads only those experts on the survivors, in
parallel, and forms the next epoch; the loop applies the commit and runs the same step again from
its inputs (its KV writes are idempotent and nothing was sampled yet, so every stream keeps exactly
its tokens). The worker count and --redundancy's copies are then restored in the background, from
standby workers first (--standby-workers: processes started ahead, with no weights): while nothing
else changed the plan, the new workers take the lost ones' places, so only the lost copies move
(from the survivors' memory where they hold them) and the placement is the one before the loss.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import ray
import torch

from expertmesh.cluster.change_runner import ChangeInterrupted, ChangeRunner
from expertmesh.cluster.health import HeartbeatMonitor
from expertmesh.cluster.memory_budget import expert_bytes, memory_budget, redundancy_shortfall
from expertmesh.cluster.placement import PlacementError, PlacementPlan
from expertmesh.cluster.progress import progress
from expertmesh.cluster.rebuild import find_previous
from expertmesh.cluster.record import Placement, PlacementRecord, RecordWriter, StaleRecord
from expertmesh.cluster.router_set import RouterSet
from expertmesh.cluster.standby import StandbyPool
from expertmesh.cluster.worker_pool import (
    WorkerHandle,
    ensure_ray,
    free_port,
    start_workers,
    stop_worker,
    unresponsive,
    use_gpus,
)
from expertmesh.core import wire
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import DEFAULTS, ServingConfig
from expertmesh.router.dispatcher import ExpertDispatcher, ReplyRecord
from expertmesh.router.engine import DTYPES, Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.model import RouterModel

log = logging.getLogger("expertmesh.cluster")
CONTROL_CALL_S = 10.0  # a control call (held, drop, stats) that a live worker answers well within this
MIN_LOAD_BYTES_S = 20e6  # a load slower than this (a disk at a crawl, a wedged worker) is given up
COMMIT_WAIT_S = 300.0  # a step boundary comes within one step; a CPU step at real sizes can take tens of seconds
__all__ = ["ChangeInterrupted", "ExpertCluster", "StaleRecord"]


class ExpertCluster:
    """Workers placed, weights loaded, epoch 0 formed; `engine` generates (through one serving loop,
    which attaches itself: ServingEngine(..., control=cluster))."""

    def __init__(self, model_dir, num_workers: int, plan: PlacementPlan | None = None,
                 replicas: str | None = None, address: str | None = None,
                 settings: ServingConfig = DEFAULTS, kv_blocks: int = 512):
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
        # "auto": GPU workers (and NCCL) when this router process has a GPU, else CPU and gloo. GPU
        # bundles that the cluster lacks make Ray's autoscaler add GPU nodes (KubeRay: GPU pods).
        self.gpus = use_gpus(settings.device)
        self.expert_bytes = expert_bytes(config, settings, self.gpus)  # one (layer, expert) as held
        self.budget = memory_budget(settings, self.expert_bytes)  # None: no --worker-memory
        plan = plan.with_min_copies(settings.redundancy, self.budget)
        plan.validate(self.budget)
        shortfall = redundancy_shortfall(plan, settings.redundancy)
        if shortfall:
            progress(shortfall)
        self.owns_ray = ensure_ray(address)  # after the checks: a plan that cannot be starts nothing
        # On a cluster serve joined, workers and routers outlive this process, and the next serve
        # process adopts them (cluster/rebuild.py); on an embedded Ray they end with it.
        self.durable = address is not None
        previous = (find_previous(self.model_dir, settings, config.num_layers, config.num_experts) if self.durable
                    else None)
        self.target_workers = num_workers  # what restoring brings the count back to
        self.backend = "nccl" if self.gpus else "gloo"
        self.device = torch.device("cuda" if self.gpus else "cpu")
        # read by anyone; written only by the change running in `changes`
        self.record = (PlacementRecord(previous.last_worker + 1, previous.last_epoch + 1) if previous
                       else PlacementRecord())
        self.changes = ChangeRunner(self.record)
        self.standby = StandbyPool(settings.standby_workers, self._start_fresh, self.changes.stopping,
                                   self._restoring)
        self._helpers: list[threading.Thread] = []  # restorers
        # the last recovery that served on without the lost workers: (the plan before the loss, its
        # workers' ids, the record's version after): what restoring puts back, while the record is at
        # that version. Written on the control thread only.
        self._last_loss: tuple[PlacementPlan, list[int], int] | None = None
        self.loop = None  # the serving loop that applies commits (router/serving.py)
        self.recoveries = 0  # written on the control thread only
        self.metrics = None  # api/metrics.py's Metrics, when the server exports them
        self.expert_rows = torch.zeros(config.num_layers, config.num_experts, dtype=torch.int64)  # (L, E)
        self.replies = ReplyRecord()  # the data path's reply times and late replies, across epochs
        self.routers = RouterSet(self.backend, settings.collective_timeout_s)  # the fleet's other routers
        self.adopted_routers = previous.routers if previous else []  # the fleet takes them as they are
        if previous:
            workers, plan = previous.workers, previous.plan
            progress(previous.describe())
            if replicas or len(workers) != num_workers:
                progress(f"--workers {num_workers}{' and --replicas' if replicas else ''} apply to a new cluster; "
                         f"this one keeps its {len(workers)} workers and their copies (`expertmesh scale` "
                         "changes them)")
            self.target_workers = len(workers)
            for r in previous.routers:
                self.routers.adopt(r.router, r.actor)
            self.standby.put(previous.idle[:settings.standby_workers])
            for h in previous.idle[settings.standby_workers:]:
                stop_worker(h)
        else:
            ids = [self.record.new_worker_id() for _ in range(num_workers)]
            workers = start_workers(ids, {w: plan.worker_pairs(i) for i, w in enumerate(ids)}, self.model_dir,
                                    settings, self.gpus, durable=self.durable)
        try:
            if previous is not None and previous.missing:  # experts no adopted worker held: loaded first
                missing = previous.missing
                ray.get([h.actor.load.remote(missing[h.worker]) for h in workers if h.worker in missing],
                        timeout=self._load_deadline_s(sum(map(len, missing.values()))))
            self.store_host = ray.util.get_node_ip_address()
            self.store_port = free_port(self.store_host)
            self.store = wire.open_store(self.store_host, self.store_port, True, settings.collective_timeout_s)
            epoch = self.record.new_epoch()
            pairs = self._form_epoch(epoch, workers)
            self.changes.run(lambda writer: writer.write(0, epoch=epoch, plan=plan, workers=workers))
            if self.routers:  # adopted routers move to the first epoch at their own step boundaries
                self.routers.commit(epoch, dict(plan.holders))
            self.worker_bytes = ray.get([h.actor.nbytes.remote() for h in workers])
            dtype = DTYPES[settings.dtype]
            model = RouterModel.from_checkpoint(self.checkpoint, dtype, self.device, settings.quantize)  # GPU too
            cache = KVCache(config, kv_blocks, settings.block_size, dtype, self.device)
            here = ray.get_runtime_context().get_node_id()
            local = any(h.node_id == here for h in workers)
            # CPU workers on this node share its cores with the router (see Engine.layer_threads).
            self.engine = Engine(model, self._dispatcher(pairs, plan, workers), cache, pingpong=settings.pingpong,
                                 pingpong_min_tokens=settings.pingpong_min_tokens,
                                 layer_threads=1 if local and not self.gpus else None)
        except BaseException:
            self.changes.stop()
            if previous is None:  # ours (durable ones would outlive us); adopted ones serve on for another try
                for h in workers:
                    stop_worker(h)
            raise
        self.standby.refill()
        self._monitor = HeartbeatMonitor(lambda: self.record.read().workers, settings.heartbeat_timeout_s,
                                         self._fence)

    # ---- reads of the record ---------------------------------------------------------------------

    def read(self) -> Placement:
        """The placement record now: version, epoch, plan and workers, as one snapshot."""
        return self.record.read()

    @property
    def plan(self) -> PlacementPlan:
        return self.record.read().plan

    @property
    def workers(self) -> list[WorkerHandle]:
        return list(self.record.read().workers)

    @property
    def epoch(self) -> int:
        return self.record.read().epoch

    def settling(self) -> bool:
        """A recovery or a restore is asked for or running."""
        return self.changes.recovering() or self._restoring()

    def _redundant(self, plan: PlacementPlan) -> PlacementPlan:
        """plan within --worker-memory (extra copies dropped where a worker is over it), then with
        --redundancy's copies where it leaves room."""
        return plan.fitted(self.budget).with_min_copies(self.settings.redundancy, self.budget)

    # ---- the serving loop's side ---------------------------------------------------------------

    def attach(self, loop) -> None:
        """The serving loop that applies this cluster's commits from now on."""
        self.loop = loop

    def report_failure(self, exc: Exception | None) -> Future:
        """The experts failed a step (or cannot serve yet: exc None). Any thread; the future
        resolves True once the loop has the next epoch's commit and may run the step again."""
        return self.changes.ask_recovery(lambda writer: self._recover(writer, exc))

    @property
    def dispatcher(self) -> ExpertDispatcher:
        return self.engine.experts

    def _commit(self, writer: RecordWriter, based_on: int, fn, plan: PlacementPlan, members: list[WorkerHandle],
                epoch: int | None = None) -> Placement:
        """On the control thread: run fn on the serving loop's thread between two steps (it returns
        what it retired, let go here, not on the loop), then write the record (from version
        `based_on`, checked first: nothing is applied from a stale read), then the fleet's other
        routers apply the same change (to `epoch`'s pairs, or to the plan on the same pairs) before
        this returns, so that nothing is dropped while a router still sends rows by the old plan."""
        if self.loop is None:  # only the loop's thread touches the engine: no loop, no change
            raise ChangeInterrupted("no serving loop is attached (ServingEngine(..., control=cluster)); "
                                    "a change needs the loop that owns the engine")
        writer.check(based_on)
        applied = self.loop.call(fn)
        try:
            retired = applied.result(timeout=COMMIT_WAIT_S)
        except FutureTimeout:
            if applied.cancel():  # not started: it never will, and nothing was applied
                raise ChangeInterrupted(f"the serving loop reached no step boundary in {COMMIT_WAIT_S:.0f}s; "
                                        "the change was not applied") from None
            retired = applied.result()  # it runs now: between two steps, briefly
        after = writer.write(based_on, epoch=epoch, plan=plan, workers=members)
        del retired  # the old epoch's pairs, torn down on this thread (20-30 ms of gloo), not the loop's
        if self.routers:
            self.routers.commit(epoch, dict(plan.holders))
        return after

    def _dispatcher(self, pairs: list, plan: PlacementPlan, members: list[WorkerHandle]) -> ExpertDispatcher:
        return ExpertDispatcher(self.checkpoint.config, plan.holders, plan.num_workers, self.device, pairs,
                                self.backend, keepalive_s=max(self.settings.collective_timeout_s / 4, 0.5),
                                expert_rows=self.expert_rows, replies=self.replies,
                                on_lost=lambda lost: self._lost_on_path([members[w] for w in lost]))

    def _switch(self, epoch: int, pairs: list, plan: PlacementPlan, members: list[WorkerHandle],
                current: tuple[WorkerHandle, ...]) -> ExpertDispatcher:
        """On the loop's thread, between steps: the `current` workers that stay move to `epoch`, the
        others leave; the next step's rows go by the new plan. Returns the old dispatcher."""
        old = self.engine.experts
        staying = {h.worker for h in members}
        old.end_epoch(epoch, {i for i, h in enumerate(current) if h.worker in staying})
        for pair in old.pairs:  # nothing is posted on them any more (end_epoch waited for it all)
            wire.close_pair(pair, self.backend)
        self.engine.experts = self._dispatcher(pairs, plan, members)
        if self.metrics is not None:
            self.metrics.epoch_changes.inc()
        return old

    # ---- epochs and the world ----------------------------------------------------------------------

    def _form_epoch(self, epoch: int, members: list[WorkerHandle]) -> list:
        """Form epoch `epoch`'s pairs, one per member (core/wire.py), all at once; starts the serve
        loops of members that have none. Returns the router's ends, in members' order. On failure
        the members let the epoch go, so none ever moves into it."""
        timeout = self.settings.collective_timeout_s
        joins = [h.actor.join_epoch.remote(epoch, self.store_host, self.store_port, self.backend, timeout)
                 for h in members]
        pool = ThreadPoolExecutor(max(len(members), 1))  # the router's ends join while the workers' do
        try:
            mine = [pool.submit(wire.open_pair, self.store, epoch, h.worker, wire.ROUTER_RANK, self.backend,
                                timeout) for h in members]
            ray.get(joins, timeout=timeout + 30)
            pairs = [m.result(timeout=timeout + 30) for m in mine]
            self.routers.form(epoch, members, (self.store_host, self.store_port))
        except BaseException:
            self._forget_epoch(epoch, members)
            raise
        finally:
            pool.shutdown(wait=False)  # a join left waiting on a lost member times out by itself
        for h in members:  # new workers, and any whose loop has ended (it gave up on a lost epoch)
            if h.serving is None or ray.wait([h.serving], timeout=0)[0]:
                h.serving = h.actor.serve.remote(epoch, timeout)
        return pairs

    def _forget_epoch(self, epoch: int, members: list[WorkerHandle]) -> None:
        for h in members:  # best effort: a lost member has nothing left to forget
            h.actor.forget_epoch.remote(epoch)
        self.routers.forget(epoch, members)

    def _held(self, handles: list[WorkerHandle]) -> list[set | None]:
        """What each worker holds now, by its own report (None: it did not answer)."""
        refs = [h.actor.held.remote() for h in handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CONTROL_CALL_S)
        out = []
        for ref in refs:
            try:
                out.append({tuple(p) for p in ray.get(ref)} if ref in ready else None)
            except Exception:  # noqa: BLE001 - a lost worker: recovery deals with it
                out.append(None)
        return out

    def _reconcile(self) -> None:
        """Make the workers hold what the record says: each drops what it holds and the record does
        not name (the rollback of an abandoned change, the tail of an applied one) and loads what it
        lacks (which only a change cut short between load and commit could leave)."""
        now = self.record.read()
        refs = []
        for i, (h, held) in enumerate(zip(now.workers, self._held(list(now.workers)))):
            if held is None:
                continue
            want = set(now.plan.worker_pairs(i))
            if held - want:
                refs.append(h.actor.drop.remote(sorted(held - want)))
            if want - held:
                log.error("worker %d lacks %s of the live plan: loading them", h.worker, sorted(want - held))
                refs.append(h.actor.load.remote(sorted(want - held)))
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CONTROL_CALL_S * 6) if refs else ([], [])
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a worker lost meanwhile
                log.warning("reconcile: %s", exc)

    def differences(self) -> dict[int, tuple[list, list]]:
        """Worker id -> (held but not in the record, in the record but not held), for every worker
        where the two differ (empty: the record is the world). Taken on the control thread, between
        changes: a change in progress has loaded what its commit will name."""
        return self.between_changes(self._differences)

    def between_changes(self, fn) -> object:
        """fn() on the control thread, between two changes (no change half done); its result."""
        return self.changes.run(lambda writer: fn())

    def _differences(self) -> dict[int, tuple[list, list]]:
        now = self.record.read()
        out = {}
        for i, (h, held) in enumerate(zip(now.workers, self._held(list(now.workers)))):
            want = set(now.plan.worker_pairs(i))
            if held is None or held != want:
                out[h.worker] = (sorted((held or set()) - want), sorted(want - (held or set())))
        return out

    # ---- faults ----------------------------------------------------------------------------------

    def _fence(self, lost: list[tuple[WorkerHandle, str]]) -> None:
        """The heartbeat monitor's event: these workers are dead or stalled. A stalled one must
        never come back, and killing it closes its sockets now, so the data path sees a death."""
        for h, why in lost:
            progress(f"worker {h.worker} (pid {h.pid}) lost: {why}; fencing it")
            stop_worker(h)
        self.changes.ask_recovery(lambda writer: self._recover(writer, None), [h.worker for h, _ in lost])

    def _lost_on_path(self, lost: list[WorkerHandle]) -> None:
        """The data path lost these workers and serves on without them (on the loop's thread: must
        not wait). They are fenced and replaced by a recovery off the serving path."""
        for h in lost:
            progress(f"worker {h.worker} (pid {h.pid}) lost on the data path; replacing it")
        self.changes.ask_recovery(lambda writer: self._recover(writer, None), [h.worker for h in lost])

    def _recover(self, writer: RecordWriter, exc: Exception | None) -> bool:
        """On the control thread: the next epoch without the workers that are gone; True when the
        loop may step again."""
        start = time.monotonic()
        lost: list[WorkerHandle] = []
        try:
            now = self.record.read()
            workers, plan = list(now.workers), now.plan
            reported = self.changes.lost()
            lost = [h for h in workers if h.worker in reported]
            lost += unresponsive([h for h in workers if h not in lost], self.settings.heartbeat_timeout_s)
            if not lost and not self.engine.experts.broken:
                return True  # a loss an earlier recovery already dealt with
            for h in lost:
                stop_worker(h)  # dropped by the data path, or not answering: it must never come back
            survivors = [h for h in workers if h not in lost]
            # What survivors hold is the record's (reconciled after every change); asking them would
            # wait behind a restore's load.
            have = [set(plan.worker_pairs(workers.index(h))) for h in survivors]
            squeezed = plan
            for i in sorted((workers.index(h) for h in lost), reverse=True):
                if squeezed.num_workers > 1:  # its experts: surviving copies, else the least loaded
                    squeezed = squeezed.without_worker(i)
            squeezed = squeezed.fitted(self.budget)
            before = (plan, [h.worker for h in workers])
            if survivors and not squeezed.over_budget(self.budget):
                plan = squeezed
            elif survivors:  # no room on the survivors (--worker-memory): new workers take the lost places
                fresh = self._take_workers(len(lost))
                progress(f"the surviving workers have no room for the lost experts (--worker-memory); "
                         f"{len(fresh)} new worker(s) take the lost place(s)")
                have = [set() if h in lost else set(plan.worker_pairs(i)) for i, h in enumerate(workers)]
                survivors = [fresh.pop(0) if h in lost else h for h in workers]
            else:  # nobody left: as few workers as hold everything (Ray may need nodes for them)
                count_ = self.budget.workers_for(plan.num_layers * plan.num_experts) if self.budget else 1
                plan = PlacementPlan.spread(count_, plan.num_layers, plan.num_experts)
                survivors = self._take_workers(count_)
                have = [set()] * count_
            # Only experts with no surviving copy are loaded; all of them at once, across survivors.
            loads = [(h, sorted(set(plan.worker_pairs(i)) - held)) for i, (h, held) in enumerate(zip(survivors, have))]
            missing = sum(len(p) for _, p in loads)
            ray.get([h.actor.load.remote(p, urgent=True, peers=_peers(survivors, have, i, p))
                     for i, (h, p) in enumerate(loads) if p], timeout=self._load_deadline_s(missing))  # streams wait
            loaded_s = time.monotonic() - start
            epoch = self.record.new_epoch()
            pairs = self._form_epoch(epoch, survivors)
            after = self._commit(writer, now.version, lambda: self._switch(epoch, pairs, plan, survivors, now.workers),
                                 plan, survivors, epoch)
            if plan is squeezed:
                self._last_loss = (*before, after.version)
        except Exception:  # noqa: BLE001 - recovery itself failed: the loop fails the steps in flight
            log.exception("recovery failed")
            return False
        self.recoveries += 1
        if self.metrics is not None:
            self.metrics.recoveries.inc()
        names = ", ".join(f"worker {h.worker} (pid {h.pid})" for h in lost) or "no worker"
        why = type(exc).__name__ if exc is not None else "found by heartbeats or on the data path"
        progress(f"recovery: lost {names} ({why}); epoch {epoch} with {len(survivors)} workers, {missing} "
                 f"expert copies loaded (after {loaded_s:.2f}s), in {time.monotonic() - start:.2f}s")
        if not self.changes.stopping.is_set() and (len(survivors) < self.target_workers or missing or lost):
            self._helper(self._restore, "expertmesh-restore")
        return True

    def _restore(self) -> None:
        """In the background: the configured worker count and --redundancy's copies back; new
        workers take the lost ones' places where nothing changed the plan since the loss."""
        try:
            placed = self._put_back()
            if not placed or len(self.record.read().workers) < self.target_workers:
                self.scale_workers(self.target_workers, reason="restoring after a lost worker")
        except Exception as exc:  # noqa: BLE001 - serving goes on; copies on the survivors meanwhile
            if self.changes.stopping.is_set():
                return
            progress(f"could not restore {self.target_workers} workers yet ({exc}); restoring copies on the "
                     "workers there are")
            try:
                self.changes.run(self._scale_to, None, [], "restoring copies")
            except Exception as exc2:  # noqa: BLE001
                log.warning("could not restore copies: %s", exc2)

    def _put_back(self) -> bool:
        """The placement before the last loss, with new workers (standby first) holding what the
        lost ones held: only the lost copies move, from the survivors' memory where they hold them,
        and the survivors keep what they serve. False when the record moved since (or the loss
        left no place to fill); the caller then restores by scaling."""
        last, now = self._last_loss, self.record.read()
        if last is None or last[2] != now.version:
            return False
        before, ids, version = last
        alive = {h.worker for h in now.workers}
        lost = [i for i, w in enumerate(ids) if w not in alive]
        if not lost or len(now.workers) + len(lost) > self.target_workers:
            return False
        fresh = self._take_workers(len(lost))

        ran = []

        def change(writer: RecordWriter) -> bool:  # the record may have moved while workers started
            ran.append(True)
            current = self.record.read()
            if current.version != version:
                self.standby.put(fresh)  # they hold nothing: back to standby for the scaling that follows
                return False
            order = [ids.index(h.worker) for h in current.workers] + lost
            names = ", ".join(f"worker {ids[i]}" for i in lost)
            self._reconfigure(writer, version, self._redundant(before.renumbered(order)), list(current.workers),
                              fresh, f"new workers in the places of {names}")
            return True
        try:
            return self.changes.run(change)
        except BaseException:
            if not ran:  # the change never ran (the cluster is stopping): nothing else stops them
                for h in fresh:
                    stop_worker(h)
            raise

    def _load_deadline_s(self, copies: int) -> float:
        """How long loading `copies` expert copies may take before the change gives up: a worker
        loading slower than MIN_LOAD_BYTES_S is stuck, not slow."""
        return 60.0 + copies * self.expert_bytes / MIN_LOAD_BYTES_S

    def _helper(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._helpers = [t for t in self._helpers if t.is_alive()] + [thread]
        thread.start()

    def _restoring(self) -> bool:
        return any(t.name == "expertmesh-restore" and t.is_alive() for t in self._helpers)

    # ---- workers: standby and new ------------------------------------------------------------------

    def _take_workers(self, count_: int) -> list[WorkerHandle]:
        """`count_` worker processes holding nothing: standby ones first (no process to start), new
        ones for the rest (Ray may need a node for them: this waits). Any thread."""
        if self.changes.stopping.is_set():
            raise ChangeInterrupted("the cluster is stopping")
        taken = self.standby.take(count_)
        return taken + (self._start_fresh(count_ - len(taken)) if len(taken) < count_ else [])

    def _start_fresh(self, count_: int) -> list[WorkerHandle]:
        ids = [self.record.new_worker_id() for _ in range(count_)]
        return start_workers(ids, {w: [] for w in ids}, self.model_dir, self.settings, self.gpus,
                             cancel=self.changes.stopping, durable=self.durable)

    # ---- the fleet's other routers -------------------------------------------------------------

    def connect_router(self, router: int, actor) -> None:
        """Connect router `router` (a Ray actor of cluster/router_actor.py) to every worker of the
        current epoch; every change from now on reaches it too (cluster/router_set.py). On the
        control thread: no change of the record runs meanwhile."""
        def change(writer: RecordWriter) -> None:
            now = self.record.read()
            self.routers.add(router, actor, now.epoch, list(now.workers), dict(now.plan.holders),
                             (self.store_host, self.store_port))
        self.changes.run(change)

    def forget_router(self, router: int) -> None:
        """The gateway lost router `router` and fenced it: changes no longer wait for it. Any
        thread; queued behind the change in progress, not waited for."""
        try:
            self.changes.post(lambda writer: self.routers.forget_router(router))
        except ChangeInterrupted:  # stopping: no change will wait for it
            pass

    # ---- planned changes ---------------------------------------------------------------------------

    def _reconfigure(self, writer: RecordWriter, based_on: int, plan: PlacementPlan, keep: list[WorkerHandle],
                     fresh: list[WorkerHandle], reason: str) -> None:
        """On the control thread: change to `plan`, computed from version `based_on` of the record,
        whose workers are `keep` (current workers, in order) then `fresh` (started, holding nothing)."""
        start = time.monotonic()
        now = self.record.read()
        members = keep + fresh
        new_epoch = [h.worker for h in members] != [h.worker for h in now.workers]
        epoch = None
        try:
            writer.check(based_on)
            plan.validate(self.budget)
            have = self._held(keep) + [set()] * len(fresh)
            if any(held is None for held in have):
                raise ChangeInterrupted("a worker did not answer; ask again")
            loads = [(h, sorted(set(plan.worker_pairs(i)) - held)) for i, (h, held) in enumerate(zip(members, have))]
            self.changes.wait([h.actor.load.remote(p, peers=_peers(members, have, i, p))
                               for i, (h, p) in enumerate(loads) if p], "loading the new copies",
                              self._load_deadline_s(sum(len(p) for _, p in loads)))
            pairs = None
            if new_epoch:
                epoch = self.record.new_epoch()
                pairs = self._form_epoch(epoch, members)

            def commit():  # on the loop's thread
                if self.changes.interrupt.is_set():
                    raise ChangeInterrupted("a worker was lost meanwhile; ask again")
                if new_epoch:
                    return self._switch(epoch, pairs, plan, members, now.workers)
                self.engine.experts.use_plan(plan.holders)
                return None

            if self.changes.interrupt.is_set():
                raise ChangeInterrupted("a worker was lost meanwhile; ask again")
            self._commit(writer, based_on, commit, plan, members, epoch)
        except BaseException:
            if epoch is not None:
                self._forget_epoch(epoch, members)
            for h in fresh:
                stop_worker(h)
            self._reconcile()  # roll back: what was loaded for the change goes again
            raise
        self._reconcile()  # roll forward: what the new plan no longer names goes
        leaving = [h for h in now.workers if h.worker not in {m.worker for m in members}]
        if leaving:
            ray.wait([h.serving for h in leaving], num_returns=len(leaving), timeout=10)
        for h in leaving:
            stop_worker(h)
        moved = sum(len(p) for _, p in loads)
        what = f"epoch {now.epoch} -> {epoch}" if new_epoch else f"epoch {now.epoch}"
        progress(f"plan change ({reason}): {what}, {len(members)} workers, {moved} expert copies loaded, "
                 f"in {time.monotonic() - start:.2f}s")

    def _scale_to(self, writer: RecordWriter, count_: int | None, fresh: list[WorkerHandle],
                  reason: str) -> PlacementPlan:
        """On the control thread: `count_` workers (None: as many as now), taking `fresh` for new
        ones, every expert on --redundancy of them; from the record as it is now."""
        now = self.record.read()
        plan, keep = now.plan, list(now.workers)
        count_ = len(keep) if count_ is None else count_
        use, spare = fresh[:max(count_ - len(keep), 0)], fresh[max(count_ - len(keep), 0):]
        if spare:  # a recovery got there first: back to standby, they hold nothing
            self.standby.put(spare)
        for _ in use:
            plan = plan.with_new_worker()
        while len(keep) > count_:
            plan = plan.without_worker(len(keep) - 1)
            keep.pop()
        plan = self._redundant(plan)
        if plan.holders != now.plan.holders or len(keep) != len(now.workers) or use:
            self._reconfigure(writer, now.version, plan, keep, use, reason)
        return self.record.read().plan

    def apply_plan(self, plan: PlacementPlan, reason: str, based_on: int | None = None) -> PlacementPlan:
        """Change to `plan` on the current workers (the controller's rebalance). `based_on`: the
        version of the record the plan was computed from; refused (StaleRecord) if it moved since."""
        def change(writer: RecordWriter) -> PlacementPlan:
            now = self.record.read()
            if plan.num_workers != len(now.workers):
                raise PlacementError(f"the plan is for {plan.num_workers} workers; the cluster has "
                                     f"{len(now.workers)}")
            self._reconfigure(writer, now.version if based_on is None else based_on,
                              plan.with_min_copies(self.settings.redundancy, self.budget), list(now.workers), [],
                              reason)
            return self.record.read().plan
        return self.changes.run(change)

    def scale_replicas(self, spec: str) -> PlacementPlan:
        """Extra copies exactly as SPEC says ('' removes them all, down to --redundancy); returns
        once the plan is live."""
        def change(writer: RecordWriter) -> PlacementPlan:
            now = self.record.read()
            plan = now.plan.with_replica_spec(spec).with_min_copies(self.settings.redundancy, self.budget)
            self._reconfigure(writer, now.version, plan, list(now.workers), [], f"replicas {spec!r}")
            return self.record.read().plan
        return self.changes.run(change)

    def scale_workers(self, count_: int, reason: str | None = None) -> PlacementPlan:
        """Grow or shrink to `count_` workers; returns once the new epoch is live. New processes
        (standby first) are started on this thread, before the change is queued."""
        if count_ < 1:
            raise PlacementError("at least one worker is needed (use --workers 0 at start for none)")
        now = len(self.record.read().workers)
        previous, self.target_workers = self.target_workers, count_
        fresh = self._take_workers(count_ - now) if count_ > now else []
        try:
            return self.changes.run(self._scale_to, count_, fresh, reason or f"workers {now} -> {count_}")
        except ChangeInterrupted:
            if self.changes.stopping.is_set():  # the change never ran: nothing else would stop them
                for h in fresh:
                    stop_worker(h)
            raise
        except PlacementError:  # e.g. fewer workers than --worker-memory needs: the count stays
            self.target_workers = previous
            raise

    # ---- what operators see --------------------------------------------------------------------

    def load_sample(self) -> dict:
        """Cumulative load now: rows per (layer, expert) and busy seconds per worker id; the
        controller takes differences of two samples."""
        rows = self.expert_rows.clone()
        busy = {}
        for stats in self.stats():
            busy[stats["worker"]] = stats["busy_s"]
        return {"time": time.monotonic(), "busy": busy,
                "rows": {(l, e): int(rows[l, e]) for l in range(rows.shape[0]) for e in range(rows.shape[1])}}

    def placement(self) -> dict:
        """The live placement: the record's version and epoch, and per worker its id, node, pid,
        experts and the bytes of the weights it holds (None for a worker that did not answer in time)."""
        now = self.record.read()
        plan, workers = now.plan, list(now.workers)
        refs = [h.actor.stats.remote() for h in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.settings.heartbeat_timeout_s)
        rows, busy, held, messages = {}, {}, {}, {}
        for h, ref in zip(workers, refs):
            try:
                stats = ray.get(ref) if ref in ready else {}
            except Exception:  # noqa: BLE001 - a worker lost just now: recovery is on it
                stats = {}
            rows[h.worker], busy[h.worker] = stats.get("rows_received", {}), stats.get("busy_s", 0.0)
            messages[h.worker] = stats.get("messages", 0)
            held[h.worker] = stats.get("weight_bytes")  # as held: int8 and scales when quantized
        return {"epoch": now.epoch, "version": now.version, "recoveries": self.recoveries,
                "expert_bytes": self.expert_bytes,
                "worker_memory_bytes": self.budget.worker_bytes if self.budget is not None else None,
                "workers": [{"worker": h.worker, "node": h.node_id, "pid": h.pid,
                             "experts": [f"{l}:{e}" for l, e in plan.worker_pairs(i)],
                             "copies": {f"{l}:{e}": len(plan.holders[(l, e)]) for l, e in plan.worker_pairs(i)},
                             "rows": rows[h.worker], "busy_s": busy[h.worker], "weight_bytes": held[h.worker],
                             "messages": messages[h.worker]}
                            for i, h in enumerate(workers)]}

    def stats(self) -> list[dict]:
        workers = self.record.read().workers
        return ray.get([h.actor.stats.remote() for h in workers], timeout=CONTROL_CALL_S)

    def shutdown(self) -> None:
        """Stop the serve loops, free the workers and (if ours) Ray itself; quick even when Ray's
        own processes are going at the same moment (a SIGTERM to the whole process group)."""
        self.changes.stop()  # a change already running gives way; queued ones never start
        self._monitor.stop()
        workers, standby = list(self.record.read().workers), self.standby.handles()
        try:
            self.engine.experts.shutdown_workers()
            serving = [h.serving for h in workers if h.serving is not None]
            if serving:
                ray.wait(serving, num_returns=len(serving), timeout=2)
        except Exception as exc:  # noqa: BLE001 - a worker that died cannot be told
            log.warning("workers did not leave cleanly: %s", exc)
        finally:
            for h in workers + standby:
                try:
                    stop_worker(h)
                except Exception:  # noqa: BLE001 - Ray itself may be going
                    pass
            self.routers.stop_all()  # durable ones would outlive us
            for t in self._helpers:
                t.join(timeout=2)
            self.standby.join(2)
            if self.owns_ray:
                ray.shutdown()

    def __enter__(self) -> "ExpertCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _peers(members: list[WorkerHandle], have: list[set], loader: int, pairs: list) -> list:
    """[(actor, the pairs of `pairs` it holds)] for every member but `loader` that holds some: where
    the loader may copy them from instead of reading the checkpoint."""
    want = set(pairs)
    return [(h.actor, sorted(held & want)) for j, (h, held) in enumerate(zip(members, have))
            if j != loader and held and held & want]
