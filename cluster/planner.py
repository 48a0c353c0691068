"""The replica planner: given the load of every (layer, expert), the current plan and each worker's
room, a plan that balances the busiest worker of every layer while moving as few weights as it can.

A layer's step time is its busiest worker's (the router waits for every worker before the next
layer), so balance is per layer: a worker's load in a layer is the sum, over the experts it holds
there, of the expert's load divided by its copies (the router splits an expert's rows evenly among
its copies). Per layer:

1. Copies: every expert keeps one; each spare slot goes, one at a time, to the expert whose load per
   copy is highest (as DeepSeek's EPLB replicates; this minimises the largest load per copy).
2. Placement, starting from the current holders, never from scratch: an expert that loses copies
   drops them from its busiest holders; one that gains copies adds them on the least loaded workers
   with room.
3. Improvement: while moving one copy from the busiest worker to another lowers the layer's maximum,
   the best such move is made. Each copy that lands on a worker that did not hold it is one move
   (one expert's weights to load).
4. A second candidate packs the copies afresh, heaviest first onto the least loaded worker with room
   (EPLB's packing), then gives each packed set to the worker that already holds most of it, so a
   fresh packing moves few weights too. The layer takes the candidate with the lower maximum (on a
   tie, the one with fewer moves), the current placement itself among them: under a steady load a
   plan is kept as it is.

A pure function: no Ray, no torch; tests/test_planner.py tests it directly and bench/planner.py
sets it against EPLB's global policy on skewed loads.
"""

from __future__ import annotations

from expertmesh.cluster.placement import PlacementError, PlacementPlan

Pair = tuple[int, int]


def replica_counts(loads: list[float], slots: int, min_copies: int = 1) -> list[int]:
    """Copies per expert of one layer: min_copies each (--redundancy), then every spare slot to the
    expert with the most load per copy (ties: the lower expert id)."""
    if slots < len(loads) * min_copies:
        raise PlacementError(f"{slots} slots cannot hold {len(loads)} experts x {min_copies} copies")
    copies = [min_copies] * len(loads)
    for _ in range(slots - len(loads) * min_copies):
        best = max(range(len(loads)), key=lambda e: (loads[e] / copies[e], -e))
        copies[best] += 1
    return copies


def _worker_loads(holders: dict[int, list[int]], loads: list[float], num_workers: int) -> list[float]:
    out = [0.0] * num_workers
    for e, ws in holders.items():
        for w in ws:
            out[w] += loads[e] / len(ws)
    return out


def _plan_layer(loads: list[float], current: dict[int, list[int]], num_workers: int, slots_per_worker: int,
                max_copies: list[int]) -> dict[int, list[int]]:
    """One layer: expert -> its holders (a list, first holder first)."""
    holders = {e: list(ws) for e, ws in current.items()}
    room = lambda w: slots_per_worker - sum(w in ws for ws in holders.values())  # noqa: E731
    # 1-2. the target copy counts, reached from the current holders
    for e in sorted(range(len(loads)), key=lambda e: -loads[e]):
        want = min(max_copies[e], num_workers)
        while len(holders[e]) > want:  # drop from the busiest holder
            per = _worker_loads(holders, loads, num_workers)
            holders[e].remove(max(holders[e], key=lambda w: (per[w], w)))
    for e in sorted(range(len(loads)), key=lambda e: -loads[e]):
        want = min(max_copies[e], num_workers)
        while len(holders[e]) < want:
            per = _worker_loads(holders, loads, num_workers)
            free = [w for w in range(num_workers) if w not in holders[e] and room(w) > 0]
            if not free:
                break
            holders[e].append(min(free, key=lambda w: (per[w], w)))
    # 3. single-copy moves off the busiest worker while they lower the layer's maximum
    for _ in range(len(loads) * num_workers):
        per = _worker_loads(holders, loads, num_workers)
        busiest = max(range(num_workers), key=lambda w: (per[w], -w))
        best, best_max = None, max(per)
        for e, ws in holders.items():
            if busiest not in ws:
                continue
            share = loads[e] / len(ws)
            for w in range(num_workers):
                if w in ws or room(w) <= 0:
                    continue
                after = per.copy()
                after[busiest] -= share
                after[w] += share
                if max(after) < best_max - 1e-9:
                    best, best_max = (e, w), max(after)
        if best is None:
            break
        e, w = best
        holders[e][holders[e].index(busiest)] = w
    return holders


def _packed_layer(loads: list[float], current: dict[int, list[int]], num_workers: int, slots_per_worker: int,
                  copies: list[int]) -> dict[int, list[int]]:
    """Candidate 4: a fresh packing, its sets given to the workers that hold most of them already."""
    copies = [min(c, num_workers) for c in copies]
    items = sorted(((loads[e] / copies[e], e) for e in range(len(loads)) for _ in range(copies[e])), reverse=True)
    weight, packs = [0.0] * num_workers, [set() for _ in range(num_workers)]
    for share, e in items:
        fits = [p for p in range(num_workers) if len(packs[p]) < slots_per_worker and e not in packs[p]]
        p = min(fits, key=lambda p: (weight[p], p))
        weight[p] += share
        packs[p].add(e)
    held = [{e for e, ws in current.items() if w in ws} for w in range(num_workers)]
    pairs = sorted(((len(packs[p] & held[w]), p, w) for p in range(num_workers) for w in range(num_workers)),
                   reverse=True)
    owner, taken = {}, set()
    for _, p, w in pairs:  # greedy: the largest overlaps first
        if p not in owner and w not in taken:
            owner[p] = w
            taken.add(w)
    holders = {e: [] for e in range(len(loads))}
    for p, members in enumerate(packs):
        for e in members:
            holders[e].append(owner[p])
    for e, ws in holders.items():  # keep the current first holder first where it stays
        ws.sort(key=lambda w: (w not in current[e], current[e].index(w) if w in current[e] else w))
    return holders


def _layer_moves(old: dict[int, list[int]], new: dict[int, list[int]]) -> int:
    return sum(len(set(new[e]) - set(old[e])) for e in new)


def plan(load: dict[Pair, float], current: PlacementPlan, slots_per_worker: int,
         min_copies: int = 1) -> PlacementPlan:
    """The plan for `load` ((layer, expert) -> rows, any unit) on current's workers, each holding at
    most `slots_per_worker` experts per layer, every expert on at least min(min_copies, workers)."""
    num_workers, num_experts = current.num_workers, current.num_experts
    slots = min(num_workers * slots_per_worker, num_experts * num_workers)
    min_copies = min(min_copies, num_workers)
    if slots < num_experts * min_copies:
        raise PlacementError(f"{num_workers} workers x {slots_per_worker} slots cannot hold {num_experts} "
                             f"experts per layer x {min_copies} copies")
    holders: dict[Pair, tuple[int, ...]] = {}
    for layer in range(current.num_layers):
        loads = [float(load.get((layer, e), 0.0)) for e in range(num_experts)]
        copies = replica_counts(loads, slots, min_copies)
        now = {e: list(current.holders[(layer, e)]) for e in range(num_experts)}
        candidates = [_plan_layer(loads, now, num_workers, slots_per_worker, copies),
                      _packed_layer(loads, now, num_workers, slots_per_worker, copies)]
        if all(sum(w in ws for ws in now.values()) <= slots_per_worker for w in range(num_workers)):
            candidates.insert(0, now)  # no move at all, when nothing else is better
        layer_plan = min(candidates, key=lambda c: (round(max(_worker_loads(c, loads, num_workers)), 9),
                                                    _layer_moves(now, c)))
        holders.update({(layer, e): tuple(ws) for e, ws in layer_plan.items()})
    new = PlacementPlan(num_workers, current.num_layers, num_experts, holders)
    new.validate()
    return new


def balance(plan_: PlacementPlan, load: dict[Pair, float]) -> float:
    """Mean over layers of (busiest worker's load / mean worker load): 1.0 is perfect."""
    ratios = []
    for layer in range(plan_.num_layers):
        loads = [float(load.get((layer, e), 0.0)) for e in range(plan_.num_experts)]
        per = _worker_loads({e: list(plan_.holders[(layer, e)]) for e in range(plan_.num_experts)}, loads,
                            plan_.num_workers)
        mean = sum(per) / len(per)
        ratios.append(max(per) / mean if mean else 1.0)
    return sum(ratios) / len(ratios)


def moves(old: PlacementPlan, new: PlacementPlan) -> int:
    """Copies the new plan puts on a worker that did not hold them: expert weights to load."""
    return sum(len(set(new.holders[p]) - set(old.holders[p])) for p in new.holders)
