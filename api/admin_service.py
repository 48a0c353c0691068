"""expertmesh.v1.Admin over grpc.aio: the live placement, and changing it while serving.

The control plane is handed in as plain callables (the application wires the cluster's), so this
adapter knows nothing of Ray. A change blocks until the new plan is live, so it runs on a thread of
its own, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("expertmesh.admin")

# The most workers or routers a Scale may ask for: Mixtral 8x22B has 448 experts, so more would hold
# less than an expert each; far fewer than a mistyped or hostile count that would have the driver
# create placement groups until its memory ran out.
MAX_SCALE = 1024


def placement_to_proto(placement: dict) -> pb.Placement:
    """The cluster's placement() dict -> Placement."""
    msg = pb.Placement(epoch=placement["epoch"], version=placement.get("version", 0),
                       recoveries=placement["recoveries"],
                       worker_memory_bytes=placement.get("worker_memory_bytes") or 0,
                       expert_bytes=placement.get("expert_bytes", 0))
    for w in placement["workers"]:
        experts = []
        for name in w["experts"]:
            layer, expert = map(int, name.split(":"))
            experts.append(pb.ExpertRef(layer=layer, expert=expert, copies=w["copies"][name],
                                        rows=w.get("rows", {}).get(name, 0)))
        msg.workers.append(pb.WorkerInfo(worker=w["worker"], node=w["node"], pid=w["pid"], experts=experts,
                                          busy_seconds=w.get("busy_s", 0.0),
                                          weight_bytes=w.get("weight_bytes") or 0, messages=w.get("messages", 0)))
    return msg


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, placement: Callable[[], dict] | None, scale_replicas: Callable[[str], object] | None,
                 scale_workers: Callable[[int], object] | None, pin: Callable[[bool], None] | None = None,
                 scale_routers: Callable[[int], object] | None = None,
                 without_cluster: str = "this server runs every expert in its own process (--workers 0): "
                 "nothing to place"):
        self.placement = placement  # None: no cluster here (--workers 0, or a gateway of its own)
        self.without_cluster = without_cluster  # why, for the caller
        self.scale_replicas = scale_replicas
        self.scale_workers = scale_workers
        self.pin = pin  # the controller's: True pins the cluster (a manual change), False hands it back
        self.scale_routers = scale_routers  # the gateway's fleet (api/router_fleet.py)

    async def _refuse_without_workers(self, context) -> None:
        if self.placement is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.without_cluster)

    async def GetPlacement(self, request, context):
        await self._refuse_without_workers(context)
        return placement_to_proto(self.placement())

    async def Scale(self, request, context):
        await self._refuse_without_workers(context)
        target = request.WhichOneof("target")
        if target is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set replicas, workers, routers or auto")
        if target == "auto":
            if self.pin is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "autoscaling is off on this server (serve --autoscale turns it on)")
            self.pin(not request.auto)
            return placement_to_proto(self.placement())
        count = request.routers if target == "routers" else request.workers if target == "workers" else 0
        if count > MAX_SCALE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{target} {count} is more than a scale may ask for (at most {MAX_SCALE})")
        if target == "routers":
            change = lambda: self.scale_routers(request.routers)  # noqa: E731 - routers are not the controller's
        else:
            if self.pin is not None:
                self.pin(True)  # what an operator sets holds until `scale --auto`
            change = (lambda: self.scale_replicas(request.replicas)) if target == "replicas" else (
                lambda: self.scale_workers(request.workers))
        try:
            await asyncio.get_running_loop().run_in_executor(None, change)
        except ValueError as exc:  # an impossible plan: an expert with no holder, more copies than workers
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)[:1000])
        except TimeoutError as exc:  # Ray could not place the workers in time
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc)[:1000])
        except Exception as exc:  # noqa: BLE001 - e.g. a worker lost while preparing: try again
            log.exception("scale failed")
            await context.abort(grpc.StatusCode.ABORTED, f"the change was not applied: {str(exc)[:900]}")
        return placement_to_proto(self.placement())
