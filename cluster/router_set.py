"""The fleet's other routers as the control plane sees them: each change of membership or placement
reaches every one of them.

ExpertCluster forms an epoch's pairs for router 0 (its own) and, through `form`, for each router
here; after router 0 has applied a change, `commit` has each of these apply it at its own step
boundary, and only then does the cluster let workers drop copies (add before drop). A router that
cannot form its pairs or does not confirm a change within the deadline is fenced (killed): the
gateway's fleet finds it gone and continues its streams elsewhere. Only the cluster's control
thread calls in here, so no lock is needed.
"""

from __future__ import annotations

import logging

import ray

from expertmesh.cluster.progress import progress
from expertmesh.cluster.worker_pool import WorkerHandle

log = logging.getLogger("expertmesh.cluster")


class RouterSet:
    def __init__(self, backend: str, timeout_s: float):
        self.backend = backend
        self.timeout_s = timeout_s  # a pair's every send and receive; a change's confirmation
        self.actors: dict[int, object] = {}  # router id -> its actor (cluster/router_actor.py)
        self._loops: dict[tuple[int, int], object] = {}  # (worker, router) -> the worker's serve loop for it

    def __bool__(self) -> bool:
        return bool(self.actors)

    def add(self, router: int, actor, epoch: int, members: list[WorkerHandle], holders: dict,
            store: tuple[str, int]) -> None:
        """Connect a new router to the current epoch's workers and start serving on it."""
        joins = [h.actor.join_epoch.remote(epoch, *store, self.backend, self.timeout_s, router) for h in members]
        connected = actor.connect.remote(*store, epoch, [h.worker for h in members], holders)
        try:
            ray.get(joins + [connected], timeout=self.timeout_s + 60)
        except BaseException:
            for h in members:
                h.actor.forget_epoch.remote(epoch, router)
            raise
        self.actors[router] = actor
        self._start_loops(epoch, members, [router])

    def adopt(self, router: int, actor) -> None:
        """A router a lost serve process left serving (cluster/rebuild.py): it joins the next
        epoch formed, and switches to it at commit like the others."""
        self.actors[router] = actor

    def stop_all(self) -> None:
        """The cluster shuts down: every router goes (durable ones would outlive the serve process)."""
        for actor in self.actors.values():
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - gone already, or Ray is going
                pass
        self.actors.clear()

    def form(self, epoch: int, members: list[WorkerHandle], store: tuple[str, int]) -> None:
        """Every router's pairs with `members` in `epoch` (beside router 0's), all at once."""
        waits = {}
        for router, actor in self.actors.items():
            joins = [h.actor.join_epoch.remote(epoch, *store, self.backend, self.timeout_s, router) for h in members]
            waits[router] = joins + [actor.prepare.remote(*store, epoch, [h.worker for h in members])]
        for router, refs in waits.items():
            try:
                ray.get(refs, timeout=self.timeout_s + 30)
            except Exception as exc:  # noqa: BLE001 - a lost member fails the epoch; a lost router only itself
                if not _alive(self.actors[router]):
                    self.fence(router, f"it did not form epoch {epoch} ({type(exc).__name__})")
                else:
                    raise
        self._start_loops(epoch, members, list(self.actors))

    def forget(self, epoch: int, members: list[WorkerHandle]) -> None:
        """Epoch `epoch` never went live: every router and member lets its pairs go (best effort)."""
        for router, actor in self.actors.items():
            actor.forget.remote(epoch)
            for h in members:
                h.actor.forget_epoch.remote(epoch, router)

    def commit(self, epoch: int | None, holders: dict) -> None:
        """Every router applies the change router 0 has applied: to `epoch`'s pairs (prepared by
        form), or to a new plan on the same pairs (epoch None). A router that does not confirm in
        time is fenced."""
        refs = {router: (actor.switch.remote(epoch, holders, self.timeout_s) if epoch is not None
                         else actor.use_plan.remote(holders, self.timeout_s))
                for router, actor in self.actors.items()}
        for router, ref in refs.items():
            try:
                ray.get(ref, timeout=self.timeout_s + 10)
                if epoch is not None:
                    progress(f"router {router} switched to epoch {epoch}")
            except Exception as exc:  # noqa: BLE001 - lost, stalled or refused: it cannot serve the new plan
                self.fence(router, f"it did not apply the change ({type(exc).__name__}: {str(exc)[:200]})")

    def fence(self, router: int, why: str) -> None:
        actor = self.actors.pop(router, None)
        if actor is None:
            return
        progress(f"router {router} fenced: {why}")
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def forget_router(self, router: int) -> None:
        """The gateway lost this router (and fenced it): no change waits for it any more."""
        self.actors.pop(router, None)

    def _start_loops(self, epoch: int, members: list[WorkerHandle], routers: list[int]) -> None:
        """A serve loop on each member for each router, where it has none (new workers); the others
        move into `epoch` when their router sends OP_SWITCH."""
        for h in members:
            for router in routers:
                loop = self._loops.get((h.worker, router))
                if loop is None or ray.wait([loop], timeout=0)[0]:
                    self._loops[(h.worker, router)] = h.actor.serve.remote(epoch, self.timeout_s, router)


def _alive(actor) -> bool:
    try:
        ray.get(actor.where.remote(), timeout=5)
        return True
    except Exception:  # noqa: BLE001 - dead or stalled
        return False
