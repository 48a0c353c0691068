"""Rebuilding the placement record from what workers and routers report, when a serve process comes
back to a Ray cluster whose previous serve process was lost.

On a cluster that serve joined (`serve --address`), workers and router actors are durable: named,
detached Ray actors that outlive the serve process that started them. While no serve process runs,
they go on serving the epoch they are in (through `expertmesh gateway --cluster`); only changes
wait, since the record and the change runner lived in the lost process. A serve process started on
that cluster adopts them instead of starting new ones:

- workers: each says who it is, what it holds (`held`), which epochs it has pairs in, and which
  Ray job started it (ones that hold nothing were standby: they are standby again); routers say
  their epoch. Only a previous serve process that is gone is
  adopted from: a live one's workers are its own (OwnedElsewhere).
- the record: version 0 again; the plan is what the workers hold, in worker id order; an expert no
  worker holds (a worker lost meanwhile) is given to the least loaded one, which loads it before
  the first epoch; worker ids and epochs continue above every one reported.
- the first epoch is formed with every adopted worker and router (the new serve process hosts the
  store its pairs form on), and each adopted router switches to it at its own step boundary.

Workers or routers that do not answer, or that serve another model or dtype, are stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup, remove_placement_group

from expertmesh.cluster.placement import PlacementPlan
from expertmesh.cluster.progress import progress
from expertmesh.cluster.router_actor import RouterHandle, router_name
from expertmesh.cluster.worker_pool import NAMESPACE, WorkerHandle, named_ids, worker_group_name, worker_name
from expertmesh.core.settings import ServingConfig

ASK_S = 10.0  # a live worker or router answers a control call well within this


class OwnedElsewhere(RuntimeError):
    """The cluster's workers belong to a serve process that still runs."""


@dataclass
class Previous:
    """What a lost serve process left serving, as its workers and routers report it."""
    workers: list[WorkerHandle]  # in worker id order: the plan's order
    plan: PlacementPlan  # what they hold, every expert placed
    missing: dict[int, list]  # worker id -> experts it must load first (no worker held them)
    routers: list[RouterHandle]
    idle: list[WorkerHandle]  # workers holding nothing (its standby ones)
    last_epoch: int  # the highest epoch any of them has pairs in
    last_worker: int  # the highest worker id seen

    def describe(self) -> str:
        workers = ", ".join(str(h.worker) for h in self.workers)
        routers = ", ".join(str(r.router) for r in self.routers) or "none"
        standby = "; standby " + ", ".join(str(h.worker) for h in self.idle) if self.idle else ""
        return (f"adopting what a lost serve process left: worker(s) {workers}, router(s) {routers}{standby}; the "
                f"placement record rebuilt from what they hold (epochs up to {self.last_epoch}, "
                f"{sum(map(len, self.missing.values()))} experts held by none)")


def find_previous(model_dir: str, settings: ServingConfig, num_layers: int, num_experts: int) -> Previous | None:
    """The workers and routers a lost serve process left on this Ray cluster, or None."""
    named_workers, named_routers = named_ids("worker"), named_ids("router")
    if not named_workers and not named_routers:
        return None
    workers = _ask(named_workers, worker_name, "where", "stats", "held")  # [(id, actor, (where, stats, held))]
    routers = _ask(named_routers, router_name, "where", "load")  # [(id, actor, (where, load))]
    _refuse_if_owned([answers[0] for _, _, answers in workers + routers])
    wanted = {"model_dir": model_dir, "dtype": settings.dtype, "quantize": settings.quantize}
    other = [where for _, _, (where, *_) in workers if {k: where.get(k) for k in wanted} != wanted]
    other += [where for _, _, (where, *_) in routers if where.get("model_dir") != model_dir]
    if other or not workers:
        why = (f"they serve {other[0].get('model_dir')} ({other[0].get('dtype', settings.dtype)}, "
               f"{other[0].get('quantize', settings.quantize)}), not {model_dir}" if other else "no worker answered")
        progress(f"stopping {len(workers)} workers and {len(routers)} routers left by a lost serve process: {why}")
        for i, actor, _ in workers:
            _stop_worker(i, actor)
        for _, actor, _ in routers:
            ray.kill(actor)
        for group in _worker_groups().values():  # lost workers' bundles too
            remove_placement_group(group)
        return None
    groups = _worker_groups()
    for i in set(groups) - {i for i, _, _ in workers}:  # a lost worker's bundle: nobody else gives it back
        remove_placement_group(groups.pop(i))
    handles = [WorkerHandle(i, actor, groups.get(i), where["node_id"], where["pid"])
               for i, actor, (where, *_) in workers]
    idle_ids = {i for i, _, (_, _, held) in workers if not held}  # standby ones
    if len(idle_ids) == len(workers):  # nothing held anywhere: they all serve again
        idle_ids = set()
    idle = [h for h in handles if h.worker in idle_ids]
    handles = [h for h in handles if h.worker not in idle_ids]
    workers = [w for w in workers if w[0] not in idle_ids]
    holders = {(l, e): () for l in range(num_layers) for e in range(num_experts)}
    for rank, (_, _, (_, _, held)) in enumerate(workers):
        for l, e in held:
            holders[(l, e)] += (rank,)
    unheld = {p for p, ws in holders.items() if not ws}
    plan = PlacementPlan(len(handles), num_layers, num_experts, holders).with_min_copies(1)
    missing = {h.worker: sorted(p for p in unheld if rank in plan.holders[p]) for rank, h in enumerate(handles)}
    adopted = []
    for i, actor, (where, load) in routers:
        if load.get("epoch") is None:  # it never joined an epoch: nothing of it to keep
            ray.kill(actor)
        else:
            adopted.append(RouterHandle(i, actor, where["pid"], where["node_id"]))
    epochs = [e for _, _, (_, stats, _) in workers for e in stats.get("epochs", [])]
    epochs += [load["epoch"] for _, _, (_, load) in routers if load.get("epoch") is not None]
    return Previous(handles, plan, {w: p for w, p in missing.items() if p}, adopted, idle, max(epochs, default=0),
                    max(h.worker for h in handles + idle))


def _ask(ids: list[int], name, *calls: str) -> list[tuple[int, object, tuple]]:
    """[(id, actor, (answers...))] for the actors that answer every call within ASK_S; the others
    (dead, stalled) are stopped: nobody else would fence them."""
    out = []
    for i in ids:
        try:
            actor = ray.get_actor(name(i), namespace=NAMESPACE)
        except ValueError:  # gone since it was listed
            continue
        try:
            answers = tuple(ray.get([getattr(actor, c).remote() for c in calls], timeout=ASK_S))
        except Exception as exc:  # noqa: BLE001 - dead or stalled
            progress(f"{name(i)} left by a lost serve process does not answer ({type(exc).__name__}); stopping it")
            if name is worker_name:
                _stop_worker(i, actor)
            else:
                ray.kill(actor)
            continue
        out.append((i, actor, answers))
    return out


def _refuse_if_owned(wheres: list[dict]) -> None:
    """OwnedElsewhere when the Ray job that started any of them still runs: one serve process per
    Ray cluster, and a live one's workers are not ours to take."""
    from ray._private import state  # the job table: which drivers still run

    alive = {j["JobID"] for j in state.jobs() if not j.get("IsDead", False)}
    owners = {w.get("job") for w in wheres} & alive
    if owners:
        raise OwnedElsewhere(f"this Ray cluster's expertmesh workers and routers belong to a serve process that "
                             f"still runs (Ray job {sorted(owners)[0]}); one serve process per Ray cluster: stop it "
                             "first, or start `expertmesh gateway --cluster ADDRESS` for another front door")


def _worker_groups() -> dict[int, PlacementGroup]:
    """Worker id -> its durable placement group (named worker_group_name(id)), where one is live."""
    out = {}
    for pg_id, entry in ray.util.placement_group_table().items():
        name, number = entry.get("name", ""), entry.get("name", "").rpartition("-")[2]
        if number.isdigit() and name == worker_group_name(int(number)) and entry.get("state") != "REMOVED":
            out[int(number)] = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
    return out


def _stop_worker(worker: int, actor) -> None:
    ray.kill(actor)
    group = _worker_groups().get(worker)
    if group is not None:
        remove_placement_group(group)
