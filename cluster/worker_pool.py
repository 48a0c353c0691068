"""Expert workers as Ray actors, each in a placement group of its own (one bundle: one GPU, or one
CPU here), so that adding a worker is a resource request Ray's autoscaler (and KubeRay) can answer
with a new node, and removing one gives its node back."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from expertmesh.cluster.progress import Bars, progress
from expertmesh.core.heap import huge_pages_env
from expertmesh.core.settings import ServingConfig
from expertmesh.workers.expert_worker import RemoteExpertWorker

log = logging.getLogger("expertmesh.cluster")
NAMESPACE = "expertmesh"  # Ray namespace of the named actors: workers (durable ones) and routers


def worker_name(worker: int) -> str:
    return f"worker-{worker}"


def worker_group_name(worker: int) -> str:
    return f"expertmesh-worker-{worker}"


def named_ids(kind: str) -> list[int]:
    """Ids N of the live actors named `kind`-N (worker, router) in NAMESPACE, sorted."""
    ids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        prefix, _, number = entry["name"].partition("-")
        if entry["namespace"] == NAMESPACE and prefix == kind and number.isdigit() and str(int(number)) == number:
            ids.append(int(number))
    return sorted(ids)


def use_gpus(device: str) -> bool:
    """--device: cuda, cpu, or auto = a GPU when this process sees one."""
    import torch

    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


class PlacementTimeout(TimeoutError):
    """Ray could not place the workers within --placement-timeout."""


@dataclass
class WorkerHandle:
    worker: int  # a stable name: worker ids are never reused
    actor: object
    placement_group: PlacementGroup
    node_id: str = ""
    pid: int = 0
    serving: object = None  # the ObjectRef of its serve loop
    stopped: bool = False  # stop_worker ran: the monitor's fence and recovery may both stop it


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join `address`, or start an embedded local Ray. Returns True when we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # Keep the embedded cluster on loopback; workers' CPU bundles are logical, not cores.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray swaps in the NIC address
    ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1),
             include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


def _wait_for_placement(groups: list[PlacementGroup], bundle: dict, timeout_s: float,
                        cancel: threading.Event | None) -> None:
    """Wait for Ray (and its autoscaler) to place the bundles, saying what we wait for: after a
    second, then every 10 s. `cancel` set (the cluster is stopping) ends the wait."""
    deadline = time.monotonic() + timeout_s
    said, pending = time.monotonic(), [g.ready() for g in groups]
    next_word = 1.0
    # on a terminal a bar, redrawn each second; in a log a line every 10 s
    bars = Bars(f"Ray placing {bundle}", ["workers"], unit="placed") if sys.stderr.isatty() else None
    while True:
        left = deadline - time.monotonic()
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(min(left, 1.0), 0))
        if not pending:
            if bars is not None and bars.rows["workers"][1]:
                bars.update("workers", len(groups), len(groups))
                bars.show(final=True)
            return
        left = deadline - time.monotonic()
        if left <= 0 or (cancel is not None and cancel.is_set()):
            for g in groups:
                remove_placement_group(g)
            if left > 0:
                raise PlacementTimeout("the cluster is stopping: placement abandoned")
            raise PlacementTimeout(f"waited {timeout_s:.0f}s for {len(groups)} bundles of {bundle}; the cluster "
                                   f"has {ray.available_resources()} free: add nodes or lower --workers")
        if time.monotonic() - said < next_word:
            continue
        if bars is None:
            progress(f"waiting for {len(pending)} bundles of {bundle} ({left:.0f}s left of --placement-timeout); "
                     "`ray status` shows why")
            said, next_word = time.monotonic(), 10.0
        else:
            bars.update("workers", len(groups) - len(pending), len(groups))
            bars.show()


def start_workers(ids: list[int], pairs: dict[int, list], model_dir: str, settings: ServingConfig,
                  gpus: bool, cancel: threading.Event | None = None, durable: bool = False) -> list[WorkerHandle]:
    """Place and start workers `ids`, each loading its `pairs[id]` from the checkpoint. Durable
    ones (serve --address) are named and outlive the serve process that started them, so that
    another can adopt them (cluster/rebuild.py); the others end with it."""
    bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
    lifetime = {"lifetime": "detached"} if durable else {}
    groups = [placement_group([bundle], **({"name": worker_group_name(i), **lifetime} if durable else {}))
              for i in ids]
    _wait_for_placement(groups, bundle, settings.placement_timeout_s, cancel)
    handles = [WorkerHandle(i, RemoteExpertWorker.options(
        num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
        scheduling_strategy=PlacementGroupSchedulingStrategy(g, 0),
        # Ray starts workers at niceness 15, behind its own daemons; a worker is on the data path of
        # every layer, so a daemon's wake-up would stall the whole step.
        # Huge pages for its weights (core/heap.py), set before the process's torch allocates.
        runtime_env={"env_vars": {"RAY_worker_niceness": "0", **huge_pages_env()}},
        **({"name": worker_name(i), "namespace": NAMESPACE, **lifetime} if durable else {}),
    ).remote(i, str(model_dir), settings.dtype, settings.worker_threads, settings.quantize), g)
        for i, g in zip(ids, groups)]
    try:
        watch_loads(handles, [h.actor.load.remote(pairs[h.worker]) for h in handles])
        for h, where in zip(handles, ray.get([h.actor.where.remote() for h in handles])):
            h.node_id, h.pid = where["node_id"], where["pid"]
    except BaseException:
        for h in handles:
            stop_worker(h)
        raise
    return handles


def watch_loads(handles: list[WorkerHandle], loads: list) -> list:
    """ray.get(loads), one per handle, showing each worker's load as it goes (bytes, rate, time left)."""
    bars = Bars("loading", [f"worker {h.worker}" for h in handles])
    pending = list(loads)
    while True:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=LOAD_POLL_S)
        polls = [h.actor.load_progress.remote() for h in handles]
        ready, _ = ray.wait(polls, num_returns=len(polls), timeout=LOAD_POLL_S)
        for h, poll in zip(handles, polls):
            if poll in ready:
                try:
                    bars.update(f"worker {h.worker}", *ray.get(poll))
                except Exception:  # noqa: BLE001 - a lost worker: its load's ref raises below
                    pass
        bars.show(final=not pending)
        if not pending:
            return ray.get(loads)


LOAD_POLL_S = 0.5


def stop_worker(handle: WorkerHandle) -> None:
    """End the actor and give its bundle (and so, maybe, its node) back; once."""
    if handle.stopped:
        return
    handle.stopped = True
    try:
        ray.kill(handle.actor)
    finally:
        remove_placement_group(handle.placement_group)


def unresponsive(handles: list[WorkerHandle], timeout_s: float) -> list[WorkerHandle]:
    """The workers that do not answer a control call within timeout_s: dead, or stopped."""
    refs = [h.actor.where.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    lost = []
    for h, ref in zip(handles, refs):
        if ref not in ready:
            lost.append(h)
            continue
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - RayActorError and kin: the actor is gone
            lost.append(h)
    return lost
