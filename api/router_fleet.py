"""The gateway's side of the router fleet: it places each request on a router, keeps each stream's
request and what its client already has, and when a router is lost continues the stream on another.

Both doors (gRPC and HTTP) call `submit` and `cancel` here as they would on one serving engine.
Router 0 is the serve process's own serving loop (no hop); routers 1.. are Ray actors
(cluster/router_actor.py), each read by a poller thread of its own, which is also its heartbeat: a
router whose process is gone, or that does not answer a poll within the deadline (SIGSTOP, a wedged
process), is lost. The fleet then fences it (kills it: it must never come back) and resubmits each
of its streams to a live router as a continuation: prompt plus the tokens the client already has,
the characters of their text it has, and the same parameters (router/requests.py's Resume). The
client's stream goes on: greedy and seeded streams exactly as without the loss, no token twice, no
gap, usage counted once, its request id its own.

One lock (`_lock`) owns the streams and the routers' states; a stream's outputs are recorded and
handed to its client under it, so a migration never reads a record that an output is about to
change. Calls into a router are made outside it (router 0's loop calls sinks holding its own lock).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

import ray

from expertmesh.router.requests import InvalidRequest, Resume, ValidRequest
from expertmesh.router.serving import (
    FINISH_ERROR,
    EngineUnavailable,
    QueueFull,
    RequestOutput,
    ServingEngine,
)

log = logging.getLogger("expertmesh.fleet")
POLL_WAIT_S = 0.25  # a poll with nothing to hand back returns after this (so it is a heartbeat too)
AFFINITY_SLACK = 8  # streams more than the least loaded router a prefix's router may hold and still get it
AFFINITY_ENTRIES = 4096  # prompt prefixes remembered
MAX_MIGRATIONS = 3  # a stream whose routers keep dying ends with an error instead of hopping forever
HISTOGRAMS_WAIT_S = 2.0  # a scrape waits this long for the router actors' histograms


@dataclass(eq=False)
class Stream:
    key: str  # the gateway's key: what cancel() takes
    valid: ValidRequest  # as the client asked, without a Resume
    client_id: str
    sink: Callable[[RequestOutput], None]
    router: "Member"
    attempt: int = 0  # which submission the outputs must belong to (a lost router's late ones do not)
    tokens: list[int] = field(default_factory=list)  # what the client has
    chars: int = 0  # characters of text the client has
    migrations: int = 0

    @property
    def router_key(self) -> str:
        return f"{self.key}:{self.attempt}"


class Member:
    """One router as the fleet sees it."""

    def __init__(self, router: int, pid: int, node_id: str):
        self.router, self.pid, self.node_id = router, pid, node_id
        self.state = "serving"  # | "lost"
        self.streams = 0  # the fleet's streams on it now
        self.load: dict = {}

    @property
    def serving(self) -> bool:
        return self.state == "serving" and self.load.get("healthy", True)

    def submit(self, key: str, valid: ValidRequest, client_id: str) -> None:
        raise NotImplementedError

    def cancel(self, key: str) -> None:
        raise NotImplementedError


class LocalRouter(Member):
    """Router 0: the serving loop of the serve process itself."""

    def __init__(self, serving: ServingEngine, deliver: Callable[["Member", str, RequestOutput], None]):
        import os

        super().__init__(0, os.getpid(), "")
        self.engine = serving
        self._deliver = deliver

    @property
    def serving(self) -> bool:
        return self.state == "serving" and self.engine.healthy

    def submit(self, key, valid, client_id) -> None:
        self.engine.submit(valid, lambda out: self._deliver(self, key, out), client_id=client_id, key=key)

    def cancel(self, key: str) -> None:
        self.engine.cancel(key)

    def snapshot(self) -> dict:
        return self.engine.server_stats()


class RemoteRouter(Member):
    """A router actor, read by a poller thread of its own."""

    def __init__(self, handle, deliver, lost: Callable[["Member", str], None], deadline_s: float, gateway: str):
        super().__init__(handle.router, handle.pid, handle.node_id)
        self.actor = handle.actor
        self._deliver, self._lost, self.deadline_s = deliver, lost, deadline_s
        self.gateway = gateway  # this fleet's name at the router: its outbox there
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name=f"expertmesh-router-{self.router}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, key, valid, client_id) -> None:
        self.actor.submit.remote(key, valid, client_id, self.gateway)  # a refusal comes back as the key's last output

    def cancel(self, key: str) -> None:
        self.actor.cancel.remote(key)

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict:
        return dict(self.load)

    def _poll(self) -> None:
        while not self._stop.is_set():
            ref = self.actor.poll.remote(POLL_WAIT_S, self.gateway)
            try:
                outputs, self.load = ray.get(ref, timeout=self.deadline_s)
            except ray.exceptions.GetTimeoutError:
                self._lost(self, f"no answer to a poll for {self.deadline_s:.1f}s")
                return
            except Exception as exc:  # noqa: BLE001 - RayActorError and kin: the process is gone
                if not self._stop.is_set():
                    self._lost(self, f"its process is gone ({type(exc).__name__})")
                return
            for key, out in outputs:
                self._deliver(self, key, out)


class RouterFleet:
    """submit/cancel for the doors, over router 0 (`local`, the serve process's) and the router
    actors `remote`. A gateway of its own (`expertmesh gateway`) has no router 0: `local` is None
    and `model` gives what the doors need (limits, grammars, tokenizer)."""

    def __init__(self, local: ServingEngine | None, remote: list, router_deadline_s: float, block_size: int = 16,
                 local_epoch: Callable[[], int] = lambda: 0, on_lost: Callable[[int], None] = lambda router: None,
                 start: Callable[[list[int]], list] | None = None, model=None):
        """local_epoch: router 0's membership epoch now; on_lost(router): the control plane's hook
        (changes stop waiting for a router the fleet fenced or drained); start(ids): new router
        actors, connected to every worker (cluster/router_actor.py's start_routers), for scale()."""
        self.local_engine = local
        self.local_epoch, self.on_lost, self._start = local_epoch, on_lost, start
        self.deadline_s = router_deadline_s
        self.gateway = uuid.uuid4().hex[:12]  # this fleet's name at each router actor
        self._scaling = threading.Lock()  # one scale() at a time
        model = model or local
        self.limits, self.grammars, self.tokenizer = model.limits, model.grammars, model.tokenizer
        self.block_size = block_size
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._affinity: OrderedDict[bytes, int] = OrderedDict()  # prompt's first block -> router
        self.migrated = 0  # streams continued on another router
        self.lost: list[dict] = []  # routers lost: id, pid, why
        self.members: list[Member] = [] if local is None else [LocalRouter(local, self._deliver)]
        self.add(remote)

    def add(self, handles: list) -> None:
        """Router actors `handles` (connected to the workers) take requests from now on."""
        added = [RemoteRouter(h, self._deliver, self._lose, self.deadline_s, self.gateway) for h in handles]
        with self._lock:
            self.members += added
        for m in added:
            m.start()

    def serving_ids(self) -> set[int]:
        """The routers that take this fleet's requests now."""
        with self._lock:
            return {m.router for m in self.members if m.state == "serving"}

    def _remote(self) -> list["RemoteRouter"]:
        return [m for m in self.members if isinstance(m, RemoteRouter)]

    # ---- the doors' side ---------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return any(m.serving for m in self.members)

    def stalled(self, after_s: float) -> bool:
        """The fleet cannot serve now: router 0 is stuck in a step and no other router serves."""
        local_stalled = self.local_engine is None or self.local_engine.stalled(after_s)
        return local_stalled and not any(m.serving for m in self._remote())

    def submit(self, valid: ValidRequest, sink: Callable[[RequestOutput], None], client_id: str = "") -> str:
        key = uuid.uuid4().hex
        with self._lock:
            router = self._choose(valid, exclude=None)
            if router is None:
                raise EngineUnavailable("no router is serving")
            stream = Stream(key, valid, client_id or key, sink, router)
            self._streams[key] = stream
            router.streams += 1
        try:
            router.submit(stream.router_key, valid, stream.client_id)
        except (QueueFull, EngineUnavailable, InvalidRequest):
            with self._lock:
                self._drop(stream)
            raise
        return key

    def cancel(self, key: str) -> None:
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                return
            self._drop(stream)
        stream.router.cancel(stream.router_key)

    def server_stats(self) -> dict:
        """Sums over the routers that serve (router 0's, and each actor's last reported load)."""
        total = dict.fromkeys(("running", "waiting", "kv_blocks_free", "kv_blocks_total", "steps"), 0)
        if self.local_engine is not None:
            total = self.local_engine.server_stats()
        for m in self._remote():
            if m.state == "serving":
                for name in ("running", "waiting", "kv_blocks_free", "kv_blocks_total", "steps"):
                    total[name] += m.load.get(name, 0)
        total["healthy"] = self.healthy
        return total

    def load_sample(self) -> list[dict]:
        """Each serving router's waiting requests and share of KV blocks in use now (the router
        controller's reading)."""
        with self._lock:
            members = [m for m in self.members if m.serving]
        out = []
        for m in members:
            load = m.snapshot()
            total = load.get("kv_blocks_total") or 0
            used = (total - load.get("kv_blocks_free", 0)) / total if total else 0.0
            out.append({"router": m.router, "waiting": load.get("waiting", 0), "kv_used": used})
        return out

    def router_histograms(self, timeout_s: float = HISTOGRAMS_WAIT_S) -> dict[int, dict]:
        """Router id -> its actor's histograms and counters now (router/loop_histograms.py), for
        the serving router actors that answer within timeout_s (asked all at once)."""
        with self._lock:
            asked = {m.router: m.actor.histograms.remote() for m in self._remote() if m.state == "serving"}
        if not asked:
            return {}
        ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout_s)
        out = {}
        for router, ref in asked.items():
            if ref in ready:
                try:
                    snapshot = ray.get(ref)
                except Exception:  # noqa: BLE001 - lost meanwhile: the poller reports it
                    continue
                if snapshot:
                    out[router] = snapshot
        return out

    def routers(self) -> list[dict]:
        """Each router: id, pid, node, state, the fleet's streams on it, its KV use."""
        with self._lock:
            out = []
            for m in self.members:
                if m.state == "drained":
                    continue
                load = m.snapshot() if m.state == "serving" else {}
                epoch = self.local_epoch() if isinstance(m, LocalRouter) else load.get("epoch") or 0
                out.append({"router": m.router, "pid": m.pid, "node": m.node_id, "epoch": epoch,
                            "state": m.state if m.serving or m.state == "lost" else "unhealthy",
                            "streams": m.streams, "kv_blocks_free": load.get("kv_blocks_free", 0),
                            "kv_blocks_total": load.get("kv_blocks_total", 0)})
            return out

    def scale(self, count: int) -> None:
        """Grow to `count` routers (new actors, started and connected before they take requests) or
        shrink: the newest routers drain (they take no new request, their streams go on on the others
        at once, a re-prefill each) and leave. Router 0, the serve process's own, always stays."""
        if count < 1:
            raise ValueError(f"at least one router is needed (router 0 always serves), got {count}")
        with self._scaling:
            with self._lock:
                live = [m for m in self.members if m.state == "serving"]
                next_id = max((m.router for m in self.members), default=0) + 1
            if count > len(live):
                if self._start is None:
                    raise ValueError("this server cannot start routers")
                self.add(self._start(list(range(next_id, next_id + count - len(live)))))
            remote = [m for m in live if isinstance(m, RemoteRouter)]
            for m in sorted(remote, key=lambda m: m.router, reverse=True)[:max(len(live) - count, 0)]:
                self._drain(m)

    def _drain(self, member: "RemoteRouter") -> None:
        moves = []
        with self._lock:
            member.state = "drained"
            for stream in [s for s in self._streams.values() if s.router is member]:
                moves.append(self._move(stream, exclude=member))
        log.warning("router %d (pid %d) drained: %d streams go on on the other routers", member.router, member.pid,
                    len(moves))
        self._resubmit(moves)
        member.stop()
        try:
            ray.kill(member.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.on_lost(member.router)

    def stop(self) -> None:
        """Router 0's loop cancels what is left and returns; the pollers stop."""
        remote = self._remote()
        for m in remote:
            m.stop()
        for m in remote:  # each poll returns within POLL_WAIT_S: none is left in flight
            m.thread.join(timeout=self.deadline_s + 1)
        if self.local_engine is not None:
            self.local_engine.stop()

    # ---- placing ------------------------------------------------------------------------------

    def _prefix(self, valid: ValidRequest) -> bytes | None:
        first = valid.prompt_ids[:self.block_size]
        if len(first) < self.block_size:
            return None  # no full block: nothing a prefix cache could share
        return hashlib.blake2b(repr((valid.cache_salt, first)).encode(), digest_size=16).digest()

    def _choose(self, valid: ValidRequest, exclude: Member | None) -> Member | None:
        """Under _lock: the least loaded serving router, or the one that last took this prompt's
        first block (its prefix cache may hold it) while it is not much busier."""
        live = [m for m in self.members if m.serving and m is not exclude]
        if not live:
            return None
        least = min(live, key=lambda m: (m.streams, m.router))
        prefix = self._prefix(valid)
        if prefix is not None:
            previous = next((m for m in live if m.router == self._affinity.get(prefix)), None)
            if previous is not None and previous.streams <= least.streams + AFFINITY_SLACK:
                least = previous
            self._affinity[prefix] = least.router
            self._affinity.move_to_end(prefix)
            if len(self._affinity) > AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return least

    def _drop(self, stream: Stream) -> None:
        if self._streams.pop(stream.key, None) is not None:
            stream.router.streams -= 1

    # ---- outputs and losses ---------------------------------------------------------------------

    def _deliver(self, member: Member, router_key: str, out: RequestOutput) -> None:
        """An output of `member` for `router_key`: recorded and handed to the client, unless it
        belongs to a submission the stream has moved on from."""
        key, _, attempt = router_key.rpartition(":")
        resubmit = None
        with self._lock:
            stream = self._streams.get(key)
            if stream is None or stream.router is not member or str(stream.attempt) != attempt:
                return
            if out.error and out.retryable and stream.migrations < MAX_MIGRATIONS and any(
                    m.serving for m in self.members if m is not member):
                resubmit = self._move(stream, exclude=member)  # this router's expert path failed: another may serve
            else:
                stream.tokens += out.token_ids
                stream.chars += len(out.text)
                if out.finish_reason is not None:
                    self._drop(stream)
                self._hand_over(stream, out)
        if resubmit is not None:
            self._resubmit([resubmit])

    def _hand_over(self, stream: Stream, out: RequestOutput) -> None:
        try:
            stream.sink(out)
        except Exception:  # noqa: BLE001 - a client that went away must not stop the poller
            log.exception("stream %s: an output could not be delivered", stream.key)

    def _lose(self, member: Member, why: str) -> None:
        """A router is lost: fence it and continue each of its streams on another."""
        moves = []
        with self._lock:
            if member.state != "serving":
                return  # already lost, or drained on purpose
            member.state = "lost"
            self.lost.append({"router": member.router, "pid": member.pid, "why": why})
            streams = [s for s in self._streams.values() if s.router is member]
            log.warning("router %d (pid %d) lost: %s; continuing its %d streams on other routers",
                        member.router, member.pid, why, len(streams))
            for stream in streams:
                moves.append(self._move(stream, exclude=member))
        try:
            ray.kill(member.actor)  # a stalled router must never come back
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.on_lost(member.router)
        self._resubmit(moves)

    def _move(self, stream: Stream, exclude: Member) -> tuple | None:
        """Under _lock: point `stream` at another router, as a continuation of what its client has."""
        target = self._choose(stream.valid, exclude)
        stream.router.streams -= 1
        stream.attempt += 1
        stream.migrations += 1
        if target is None or stream.migrations > MAX_MIGRATIONS:
            self._streams.pop(stream.key, None)
            why = "no router is serving" if target is None else "its routers were lost too often"
            self._hand_over(stream, RequestOutput(stream.client_id, [], "", finish_reason=FINISH_ERROR,
                                                  error=f"the stream's router was lost and {why}", retryable=True))
            return None
        stream.router = target
        target.streams += 1
        self.migrated += 1
        resume = Resume(tuple(stream.tokens), stream.chars) if stream.tokens else None
        return stream, target, stream.router_key, replace(stream.valid, resume=resume)

    def _resubmit(self, moves: list) -> None:
        for move in moves:
            if move is None:
                continue
            stream, target, router_key, valid = move
            try:
                target.submit(router_key, valid, stream.client_id)
            except (QueueFull, EngineUnavailable, InvalidRequest) as exc:
                self._deliver(target, router_key, RequestOutput(
                    stream.client_id, [], "", finish_reason=FINISH_ERROR, retryable=not isinstance(exc, InvalidRequest),
                    error=f"the stream's router was lost and it could not go on: {exc}"))
