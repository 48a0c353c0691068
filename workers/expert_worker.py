"""The expert worker: a Ray actor that owns some (layer, expert) weights and serves rows for them.

Control arrives by Ray calls, on threads of their own while `serve` runs: load or drop experts, join
the next epoch's pair with the router, stats. Hidden states arrive only over the current epoch's
pair (core/wire.py), in the loop of `serve`, which moves to the next epoch on OP_SWITCH and returns
on OP_SHUTDOWN.

Experts change while serving: new ones load off the data path and their layer's table is swapped in
whole (the router sends them rows only once its new plan is live); dropped ones go only after the
router's plan no longer names them. Changes run one at a time, in the order they arrive, on one
thread of their own; `held` reports what this worker holds, which the control plane's placement
record is reconciled with.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from expertmesh.workers.quiet_start import import_quietly

import_quietly()  # torch's import at nice 19: this process may be starting beside serving ones

import ray  # noqa: E402
import torch  # noqa: E402

from expertmesh.core import cpu_kernels, wire  # noqa: E402
from expertmesh.core.checkpoint import Checkpoint  # noqa: E402
from expertmesh.core.heap import release_free_heap  # noqa: E402
from expertmesh.core.linear import Linear  # noqa: E402
from expertmesh.workers.grouped_mlp import LayerExperts, grouped_experts  # noqa: E402

log = logging.getLogger("expertmesh.worker")
EXPORT_TIMEOUT_S = 300.0  # one expert from a peer (352 MB in bf16): seconds at any sane bandwidth


class ExpertWorker:
    def __init__(self, worker: int, model_dir: str, dtype: str, threads: int, quantize: str = "none"):
        self.worker = worker  # a stable name for logs; the rank changes with every epoch
        self.model_dir = model_dir
        self.dtype = getattr(torch, dtype)
        self.quantize = quantize  # "int8": experts held in int8 (core/quantize.py)
        self.threads = threads  # torch threads of the serve loop (ServingConfig.worker_threads)
        self.checkpoint = Checkpoint(model_dir)
        self.config = self.checkpoint.config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pairs: set[tuple[int, int]] = set()
        self.layers: dict[int, LayerExperts] = {}  # layer -> its experts held here, stacked
        self.rows_received: Counter = Counter()  # (layer, expert) -> rows served
        self.busy_s = 0.0  # time spent computing experts (the controller's measure of load)
        self.messages = 0  # layer messages served, from every router (rows per message: bench/routers.py)
        self._store = None  # the store every epoch's pairs form on, at _store_address
        self._store_address: tuple[str, int] | None = None  # a new serve process hosts a new one
        self._pairs: dict[tuple[int, int], tuple] = {}  # (epoch, router) -> (their pair, backend)
        # pairs a serve loop has taken: each pair is served by one loop, however many wait for it
        # (a serve process that adopts this worker starts loops beside ones still running)
        self._taken: set[tuple[int, int]] = set()
        self._pair_ready = threading.Condition()
        self._lock = threading.Lock()  # the counters, and `pairs` for readers
        # Every change to the experts, in arrival order, through this one thread. An urgent one
        # (streams wait for it: nothing serves) runs on it at the usual priority, with every core.
        # Any other runs on the quiet thread, at nice 19 with one torch thread, so that it yields to
        # the serve loop, which shares the cores with the router; the change thread waits for it,
        # which keeps the order. (Two threads, not one reniced: an unprivileged process cannot lower
        # a niceness again, and not Ray's pool threads: a later call, `serve` itself, could land on one.)
        self._changes = ThreadPoolExecutor(1, thread_name_prefix="expertmesh-change")
        self._quiet = ThreadPoolExecutor(1, thread_name_prefix="expertmesh-load", initializer=_background_thread)
        # Peers' exports, beside the changes (a change here may wait on a peer's export while that
        # peer's change waits on ours), at nice 19 too: copying weights out yields to serving.
        self._exports = ThreadPoolExecutor(1, thread_name_prefix="expertmesh-export", initializer=_background_thread)
        # the best bytes/s a load from each source reached: a new copy comes from a peer's memory
        # unless that proved slower than the checkpoint (None: not measured yet; the best, not the
        # latest, so that one slow moment does not rule a source out)
        self.load_rates: dict[str, float | None] = {"peer": None, "checkpoint": None}
        # (bytes held so far, bytes to hold, began, ended or None) of the last checkpoint read, for progress bars
        self._load_progress = (0, 0, time.monotonic(), None)

    def _change(self, add: set[tuple[int, int]], drop: set[tuple[int, int]], urgent: bool = False,
                peers: list | None = None) -> None:
        """Take experts `add` from a peer's memory (peers: [(actor, its pairs)]) or read them
        straight from the safetensors files, let `drop` go, and swap each changed layer's table in
        whole (a step in flight keeps the table it started with); the experts a layer keeps are not
        read or packed again. Changes run one at a time, in arrival order (the change thread waits
        for each), so what a change reads of `layers` and `pairs` no other change alters meanwhile."""
        self._changes.submit(self._apply_change, add, drop, urgent, peers).result()

    def _apply_change(self, add: set[tuple[int, int]], drop: set[tuple[int, int]], urgent: bool = False,
                      peers: list | None = None) -> None:
        if urgent:  # a recovery: streams wait for these experts, so nothing serves meanwhile
            self._apply_now(add, drop, _usable_cores(), peers)
        else:
            self._quiet.submit(self._apply_now, add, drop, 1, peers).result()

    def _apply_now(self, add: set[tuple[int, int]], drop: set[tuple[int, int]], threads: int,
                   peers: list | None) -> None:
        torch.set_num_threads(threads)
        try:
            self._apply(add, drop, peers or [])
            release_free_heap()  # the load's transients, and what a drop let go
        finally:
            torch.set_num_threads(1)

    def _from_peers(self, add: set[tuple[int, int]], peers: list) -> dict[tuple[int, int], tuple]:
        """Those of `add` that peers hold and hand over, as ready (w13, w2) layers; one expert at a
        time, so at most one expert's copy is in flight. A peer lost meanwhile hands over nothing:
        the checkpoint has the rest."""
        peer, checkpoint = self.load_rates["peer"], self.load_rates["checkpoint"]
        if self.device.type != "cpu" or (peer is not None and checkpoint is not None and peer < checkpoint):
            return {}
        start, got = time.perf_counter(), {}
        for actor, pairs in peers:
            for pair in sorted({tuple(p) for p in pairs} & add - got.keys()):
                try:
                    [ref] = ray.get(actor.export.remote(pair), timeout=EXPORT_TIMEOUT_S)
                    states = _from_wire(ray.get(ref, timeout=EXPORT_TIMEOUT_S)) if ref is not None else None
                except Exception as exc:  # noqa: BLE001 - a lost or slow peer: the checkpoint has it
                    log.warning("worker %d: peer copy of %s failed (%s); reading the checkpoint", self.worker,
                                pair, exc)
                    break
                layers = tuple(Linear.from_state(s) for s in states) if states is not None else (None,)
                if None not in layers:
                    got[pair] = layers
        if got:
            nbytes = sum(layer.nbytes for layers in got.values() for layer in layers)
            self._rate("peer", nbytes / max(time.perf_counter() - start, 1e-9))
        return got

    def _apply(self, add: set[tuple[int, int]], drop: set[tuple[int, int]], peers: list) -> None:
        add, drop = add - self.pairs, drop & self.pairs  # against what is held now, after earlier changes
        if not add and not drop:
            return
        prepared: dict[int, dict[int, tuple]] = {}
        for (layer, expert), layers in self._from_peers(add, peers).items():
            prepared.setdefault(layer, {})[expert] = layers
        read = sorted(p for p in add if p[1] not in prepared.get(p[0], {}))
        read_by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, expert in read:
            read_by_layer.setdefault(layer, []).append((layer, expert))
        gone: dict[int, set[int]] = {}
        for layer, expert in drop:
            gone.setdefault(layer, set()).add(expert)
        before = self.nbytes() + sum(layer.nbytes for experts in prepared.values() for layers in experts.values()
                                     for layer in layers)
        per_expert = LayerExperts.bytes_per_expert(self.config.hidden_size, self.config.intermediate_size, self.dtype,
                                                   self.quantize, self.device.type)
        start = time.perf_counter()
        done, self._load_progress = 0, (0, len(read) * per_expert, time.monotonic(), None)
        # views of the checkpoint's mapping where its dtype is ours: each laid out (or quantized, or
        # moved to the GPU) in one copy as its layer is built, and the mapping goes when they do; not
        # where a layer would hold the weight as given (no C kernels: the view would stay mapped)
        mapped = self.device.type == "cuda" or self.quantize != "none" or cpu_kernels.kernels() is not None
        # a layer at a time: one layer's transients at once, and progress to show as each is built
        for layer in sorted(set(read_by_layer) | set(gone) | set(prepared)):
            fresh = {expert: tuple(w.to(self.device) for w in ws) for (_, expert), ws in
                     self.checkpoint.read_experts(read_by_layer[layer], self.dtype, mapped).items()
                     } if layer in read_by_layer else {}
            done += len(fresh) * per_expert  # counted now: building the table empties `fresh`
            held = self.layers.get(layer)
            if held is None and not prepared.get(layer):
                table = LayerExperts.stack(fresh, quantize=self.quantize)
            else:
                table = (held or LayerExperts.empty(self.quantize)).changed(fresh, gone.get(layer, set()),
                                                                            prepared.get(layer))
            with self._lock:
                if table is None:
                    self.layers.pop(layer, None)
                else:
                    self.layers[layer] = table
            _, total, began, _ = self._load_progress
            self._load_progress = (done, total, began, time.monotonic() if done == total else None)
        with self._lock:
            self.pairs = (self.pairs | add) - drop
        if read and not drop:  # the checkpoint's rate: the bytes its experts added (read and packed)
            self._rate("checkpoint", (self.nbytes() - before) / max(time.perf_counter() - start, 1e-9))

    def _rate(self, source: str, rate: float) -> None:
        self.load_rates[source] = max(self.load_rates[source] or 0.0, rate)

    def load(self, pairs: list[tuple[int, int]], urgent: bool = False, peers: list | None = None) -> int:
        """Hold these experts too; returns the bytes held. urgent: streams wait for them. peers:
        [(actor, pairs it holds)] to copy from, where that is not slower than the checkpoint."""
        self._change({tuple(p) for p in pairs}, set(), urgent, peers)
        return self.nbytes()

    def load_progress(self) -> tuple[int, int, float]:
        """(bytes read and laid out, bytes to, seconds since it began) of the load running now;
        answered while it runs."""
        done, total, began, ended = self._load_progress
        return done, total, (ended or time.monotonic()) - began

    def export(self, pair: tuple[int, int]) -> list:
        """[a reference to expert `pair` as held] (in Ray's object store, put by a thread at nice 19),
        for a peer's `load`; [None] when it is not held here or cannot leave this process."""
        def put():
            with self._lock:
                table = self.layers.get(pair[0])
            states = table.export(pair[1]) if table is not None and pair[1] in table.local else None
            return ray.put(_to_wire(states)) if states is not None else None
        return [self._exports.submit(put).result()]

    def drop(self, pairs: list[tuple[int, int]]) -> int:
        """Let these experts go (the router's plan no longer names them); returns the bytes held."""
        self._change(set(), {tuple(p) for p in pairs})
        return self.nbytes()

    def held(self) -> list[tuple[int, int]]:
        """The (layer, expert) pairs held now, after every change that arrived before this call."""
        return self._changes.submit(lambda: sorted(self.pairs)).result()

    def heartbeat(self) -> int:
        """Answered beside the data path: a worker that cannot answer (stopped, wedged) is stalled."""
        return os.getpid()

    def nbytes(self) -> int:
        with self._lock:
            return sum(layer.nbytes for layer in self.layers.values())

    def where(self) -> dict:
        """Where this worker runs, and what it serves: for placement, liveness checks, finding
        leftover processes, and a serve process that adopts it (cluster/rebuild.py)."""
        context = ray.get_runtime_context()
        return {"worker": self.worker, "pid": os.getpid(), "node_id": context.get_node_id(),
                "ip": ray.util.get_node_ip_address(), "job": context.get_job_id(), "model_dir": self.model_dir,
                "dtype": str(self.dtype).removeprefix("torch."), "quantize": self.quantize}

    def join_epoch(self, epoch: int, store_host: str, store_port: int, backend: str, timeout_s: float,
                   router: int = 0) -> None:
        """Form this worker's end of its pair with router `router` in epoch `epoch` (while the
        current epoch serves)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
        if self._store_address != (store_host, store_port):
            self._store = wire.open_store(store_host, store_port, False, timeout_s)
            self._store_address = (store_host, store_port)
        pair = wire.open_pair(self._store, epoch, self.worker, wire.WORKER_RANK, backend, timeout_s, router)
        with self._pair_ready:
            self._pairs[(epoch, router)] = (pair, backend)
            self._pair_ready.notify_all()

    def forget_epoch(self, epoch: int, router: int = 0) -> None:
        """Epoch `epoch` never went live for router `router` (its change was abandoned): let its
        pair go, so that the serve loop never moves into it."""
        with self._pair_ready:
            joined = self._pairs.pop((epoch, router), None)
        if joined is not None:
            wire.close_pair(*joined)

    def stats(self) -> dict:
        with self._pair_ready:
            epochs = sorted({e for e, _ in self._pairs})  # pairs formed and not let go yet
        with self._lock:
            weight_bytes = sum(layer.nbytes for layer in self.layers.values())
            return {"worker": self.worker, "pairs": sorted(self.pairs), "busy_s": self.busy_s, "epochs": epochs,
                    "messages": self.messages,
                    "weight_bytes": weight_bytes, "load_rates": dict(self.load_rates),
                    "rows_received": {f"{l}:{e}": n for (l, e), n in self.rows_received.items()}}

    def _pair(self, epoch: int, router: int, wait_s: float):
        """Take the pair of `epoch` with `router` once it is formed; None if it is not formed in
        time or another loop took it."""
        with self._pair_ready:
            self._pair_ready.wait_for(lambda: (epoch, router) in self._pairs, timeout=wait_s)
            if (epoch, router) in self._taken:
                return None
            joined = self._pairs.get((epoch, router))
            if joined is not None:
                self._taken.add((epoch, router))
            return joined

    def serve(self, epoch: int, timeout_s: float, router: int = 0) -> str:
        """The data-path loop with router `router`, from epoch `epoch` on (one call per router, each
        on a thread of its own: every worker serves every router). Returns how it ended."""
        # Set on this thread: OpenMP thread counts are per calling thread, and a Ray threaded
        # actor runs each call on a pool thread.
        torch.set_num_threads(self.threads)
        while True:
            joined = self._pair(epoch, router, timeout_s)
            if joined is None:
                return f"epoch {epoch} never formed, or another loop serves it"
            pair, backend = joined
            try:
                ended = self._serve_epoch(pair, backend)
            except Exception as exc:  # noqa: BLE001 - a lost router (or a pair it closed) ends this epoch
                log.warning("worker %d: epoch %d ended: %s", self.worker, epoch, exc)
                ended = None
            with self._pair_ready:
                self._pairs.pop((epoch, router), None)
                self._taken.discard((epoch, router))
            wire.close_pair(pair, backend)
            if isinstance(ended, int):  # OP_SWITCH: go on in the next epoch
                epoch = ended
                continue
            if ended is None:  # the pair failed: the router may be forming the next epoch
                with self._pair_ready:
                    self._pair_ready.wait_for(lambda: any(e > epoch and r == router for e, r in self._pairs),
                                              timeout=2 * timeout_s + 30)
                    newer = [e for e, r in self._pairs if e > epoch and r == router]
                if not newer:
                    return "lost"
                epoch = max(newer)  # the latest: the control plane forms epochs in order, one at a time
                continue
            return ended

    def _serve_epoch(self, pair, backend: str) -> str | int:
        """Serve one epoch's pair until OP_SWITCH (-> the next epoch) or OP_SHUTDOWN."""
        router = wire.ROUTER_RANK
        hidden, num_experts = self.config.hidden_size, self.config.num_experts
        # gloo: one receive buffer stays posted for header and rows together (core/wire.py)
        buffer = (torch.empty(wire.message_capacity(num_experts, hidden, self.dtype), dtype=torch.uint8)
                  if wire.inlines_rows(backend) else None)
        while True:
            if buffer is not None:
                pair.recv([buffer], router, 0).wait()
                op, layer, inline, *counts = wire.unpack_header(buffer, num_experts)
            else:
                header = torch.empty(wire.header_size(num_experts), dtype=torch.int64, device=self.device)
                pair.recv([header], router, 0).wait()
                op, layer, inline, *counts = header.tolist()
            if op == wire.OP_SHUTDOWN:
                return "shutdown"
            if op == wire.OP_SWITCH:
                return layer  # the next epoch
            if op == wire.OP_PING:
                continue
            used = [(e, n) for e, n in enumerate(counts) if n]
            if inline:
                rows = wire.inline_rows(buffer, num_experts, sum(counts), hidden, self.dtype)
            else:
                rows = torch.empty(sum(counts), hidden, dtype=self.dtype, device=self.device)
                pair.recv([rows], router, 0).wait()
            held = self.layers.get(layer)
            missing = [e for e, _ in used if held is None or e not in held.local]
            if missing:  # the router's plan and ours disagree: fail loudly, never compute garbage
                raise RuntimeError(f"worker {self.worker} got rows for expert ({layer}, {missing[0]}) "
                                   "which it does not hold")
            assert rows.shape == (sum(counts), hidden), rows.shape  # (N, D), grouped by expert
            start = time.perf_counter()
            out = grouped_experts(rows, held, [e for e, _ in used], [n for _, n in used])
            if out.is_cuda:
                torch.cuda.synchronize()
            busy = time.perf_counter() - start
            assert out.shape == rows.shape, out.shape
            with self._lock:  # counted before the results go back, so stats never lag the router
                self.busy_s += busy
                self.messages += 1
                for e, n in used:
                    self.rows_received[(layer, e)] += n
            pair.send([out], router, 0).wait()


def _to_wire(states: tuple) -> tuple:
    """Linear states with every tensor as its raw bytes in a numpy array: Ray puts those in its object
    store in one copy and hands them out without one (a pickled torch tensor took 4x as long here)."""
    return tuple({k: (v.dtype, tuple(v.shape), v.contiguous().reshape(-1).view(torch.uint8).numpy())
                  if isinstance(v, torch.Tensor) else v for k, v in state.items()} for state in states)


def _from_wire(states: tuple) -> tuple:
    """_to_wire's inverse, each tensor copied out of the object store into this process's memory."""
    def tensor(dtype, shape, raw):
        out = torch.empty(raw.nbytes, dtype=torch.uint8)
        out.numpy()[:] = raw
        return out.view(dtype).reshape(shape)
    return tuple({k: tensor(*v) if isinstance(v, tuple) and len(v) == 3 and isinstance(v[0], torch.dtype) else v
                  for k, v in state.items()} for state in states)


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has it), not the machine's."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def _background_thread() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    torch.set_num_threads(1)


# The Ray actor: one thread runs `serve`, the others answer control calls (load, join the next
# epoch, stats, heartbeats) meanwhile; enough of them that a heartbeat never queues behind calls
# that wait for a long load (load, drop and held each hold a thread until their change has run).
# Made here rather than with a decorator so Ray pickles the class by reference, not by value.
RemoteExpertWorker = ray.remote(max_concurrency=16)(ExpertWorker)  # a serve loop per router, and control
