"""Finding a cluster's routers from another process: `expertmesh gateway --cluster` joins the Ray
cluster that `serve` runs on and reads the router actors there by name (cluster/router_actor.py
names each `router-N` in the `expertmesh` namespace). Ray's named-actor table is the directory: a
router is in it from its start until its process ends, so nothing else has to be kept in step."""

from __future__ import annotations

import logging

import ray

from expertmesh.cluster.router_actor import ROUTER_NAMESPACE, RouterHandle, router_name
from expertmesh.cluster.worker_pool import named_ids

log = logging.getLogger("expertmesh.gateway")
ASK_TIMEOUT_S = 10.0  # a router that cannot say where it runs within this is skipped until the next look


def router_ids() -> list[int]:
    """The routers named in the cluster now (starting, serving or draining)."""
    return named_ids("router")


def find_routers(known: set[int]) -> list[RouterHandle]:
    """Handles to the routers not in `known` that are connected to the workers and serve."""
    found = []
    for router in router_ids():
        if router in known:
            continue
        try:
            actor = ray.get_actor(router_name(router), namespace=ROUTER_NAMESPACE)
            where, load = ray.get([actor.where.remote(), actor.load.remote()], timeout=ASK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - gone, or not answering: the next look tries again
            log.info("router %d not taken yet: %s", router, exc)
            continue
        if load.get("epoch") is None:
            continue  # still connecting to the workers
        found.append(RouterHandle(router, actor, where["pid"], where["node_id"]))
    return found


def describe_model(timeout_s: float) -> dict:
    """What a serving router says of its model (router_actor.Router.describe): the first router
    that answers."""
    for router in router_ids():
        try:
            actor = ray.get_actor(router_name(router), namespace=ROUTER_NAMESPACE)
            if ray.get(actor.load.remote(), timeout=timeout_s).get("epoch") is None:
                continue
            return ray.get(actor.describe.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - try the next one
            log.info("router %d could not describe the model: %s", router, exc)
    raise LookupError("no router of this cluster serves yet")
