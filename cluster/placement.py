"""Placement plan: which expert worker holds which (layer, expert), replicas included.

A plan is a plain value: printable, JSON round-trippable, validated, and changed by building a new
one. Worker indices are 0..num_workers-1 (collective rank = worker index + 1; rank 0 is the router).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

Pair = tuple[int, int]  # (layer, expert)


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryBudget:
    """What a worker may hold (--worker-memory): `worker_bytes` of expert weights, each (layer,
    expert) copy taking `expert_bytes` as held (dtype and --quantize counted)."""
    worker_bytes: int
    expert_bytes: int

    @property
    def experts(self) -> int:
        """Expert copies one worker has room for."""
        return self.worker_bytes // self.expert_bytes

    def workers_for(self, copies: int) -> int:
        """Workers this many expert copies need at the least."""
        return -(-copies // max(self.experts, 1))


def gib(nbytes: int) -> str:
    """Bytes for people: GiB, MiB or B."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} B"


@dataclass(frozen=True)
class PlacementPlan:
    num_workers: int
    num_layers: int
    num_experts: int
    holders: dict[Pair, tuple[int, ...]]  # (layer, expert) -> workers holding a copy, in order

    @classmethod
    def spread(cls, num_workers: int, num_layers: int, num_experts: int) -> "PlacementPlan":
        """One copy of each expert; in every layer expert e goes to worker e % num_workers, so each
        layer's load spreads over all workers."""
        if num_workers <= 0:
            raise PlacementError("need at least one worker")
        holders = {(l, e): (e % num_workers,) for l in range(num_layers) for e in range(num_experts)}
        return cls(num_workers, num_layers, num_experts, holders)

    def worker_pairs(self, worker: int) -> list[Pair]:
        return sorted(p for p, ws in self.holders.items() if worker in ws)

    def validate(self, budget: MemoryBudget | None = None) -> None:
        """Every expert covered by distinct, existing workers; no worker over the memory budget."""
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                workers = self.holders.get((layer, expert))
                if not workers:
                    raise PlacementError(f"expert ({layer}, {expert}) is on no worker")
                if len(set(workers)) != len(workers):
                    raise PlacementError(f"expert ({layer}, {expert}) placed twice on one worker")
                bad = [w for w in workers if not 0 <= w < self.num_workers]
                if bad:
                    raise PlacementError(f"expert ({layer}, {expert}) on unknown worker {bad[0]}")
        extra = [p for p in self.holders if not (0 <= p[0] < self.num_layers and 0 <= p[1] < self.num_experts)]
        if extra:
            raise PlacementError(f"plan names expert {extra[0]}, which the model does not have")
        over = self.over_budget(budget)
        if over:
            w, held = over[0], len(self.worker_pairs(over[0]))
            copies = sum(len(ws) for ws in self.holders.values())
            raise PlacementError(
                f"worker {w} would hold {held} experts ({gib(held * budget.expert_bytes)}), over the "
                f"{gib(budget.worker_bytes)} a worker may hold (--worker-memory: room for {budget.experts} of "
                f"{gib(budget.expert_bytes)} each); these {copies} expert copies need at least "
                f"{budget.workers_for(copies)} workers of that size (or a larger --worker-memory, or --quantize)")

    def over_budget(self, budget: MemoryBudget | None) -> list[int]:
        """Workers that hold more experts than the budget has room for (none without a budget)."""
        if budget is None:
            return []
        load = self._load(self.holders)
        return [w for w in range(self.num_workers) if load[w] > budget.experts]

    def fitted(self, budget: MemoryBudget | None) -> "PlacementPlan":
        """This plan with extra copies dropped from workers over the budget (the most copied expert
        first) until each fits or holds only experts with no other copy; over_budget says whether
        it fits."""
        holders = dict(self.holders)
        for w in self.over_budget(budget):
            while sum(w in ws for ws in holders.values()) > budget.experts:
                spare = [p for p, ws in holders.items() if w in ws and len(ws) > 1]
                if not spare:
                    break
                pair = max(spare, key=lambda p: (len(holders[p]), p))
                holders[pair] = tuple(x for x in holders[pair] if x != w)
        return PlacementPlan(self.num_workers, self.num_layers, self.num_experts, holders)

    def with_replicas(self, spec: str) -> "PlacementPlan":
        """Add copies: SPEC is comma-separated LAYER:EXPERT[xCOPIES], LAYER may be '*' (all layers).

        '*:0x2,1:5x3' gives expert 0 two copies in every layer and expert 5 of layer 1 three.
        New copies go to the least-loaded workers that do not hold the expert yet.
        """
        holders = dict(self.holders)
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                where, _, copies = item.partition("x")
                layer_text, expert_text = where.split(":")
                layers = range(self.num_layers) if layer_text == "*" else [int(layer_text)]
                expert, copies = int(expert_text), int(copies or 2)
            except ValueError:
                raise PlacementError(f"bad replica spec {item!r}; expected LAYER:EXPERT[xCOPIES]") from None
            if copies > self.num_workers:
                raise PlacementError(f"{item!r}: {copies} copies but only {self.num_workers} workers")
            for layer in layers:
                if (layer, expert) not in holders:
                    raise PlacementError(f"{item!r}: the model has no expert ({layer}, {expert})")
                while len(holders[(layer, expert)]) < copies:
                    load = [sum(w in ws for ws in holders.values()) for w in range(self.num_workers)]
                    free = [w for w in range(self.num_workers) if w not in holders[(layer, expert)]]
                    holders[(layer, expert)] += (min(free, key=lambda w: (load[w], w)),)
        return PlacementPlan(self.num_workers, self.num_layers, self.num_experts, holders)

    def with_min_copies(self, copies: int, budget: MemoryBudget | None = None) -> "PlacementPlan":
        """Every expert on at least `copies` workers (all of them, where there are fewer) where the
        budget leaves room (--redundancy): the missing copies go to the least-loaded workers that do
        not hold the expert yet."""
        holders = dict(self.holders)
        want = min(copies, self.num_workers)
        room = budget.experts if budget is not None else len(holders)
        for pair in sorted(holders):
            while len(holders[pair]) < want:
                load = self._load(holders)
                free = [w for w in range(self.num_workers) if w not in holders[pair] and load[w] < room]
                if not free:
                    break
                holders[pair] += (min(free, key=lambda w: (load[w], w)),)
        return PlacementPlan(self.num_workers, self.num_layers, self.num_experts, holders)

    def _load(self, holders: dict[Pair, tuple[int, ...]]) -> list[int]:
        return [sum(w in ws for ws in holders.values()) for w in range(self.num_workers)]

    def with_replica_spec(self, spec: str) -> "PlacementPlan":
        """The plan whose extra copies are exactly SPEC's (same syntax as with_replicas; '' for
        none), moving as few weights as possible: each expert keeps its first holder and as many
        of its current copies as it still wants, new copies go to the least-loaded workers."""
        wanted = PlacementPlan(self.num_workers, self.num_layers, self.num_experts,
                               {p: ws[:1] for p, ws in self.holders.items()}).with_replicas(spec)
        holders = {}
        for pair, ws in self.holders.items():
            holders[pair] = ws[:len(wanted.holders[pair])]
        for pair, ws in sorted(wanted.holders.items()):
            while len(holders[pair]) < len(ws):
                load = self._load(holders)
                free = [w for w in range(self.num_workers) if w not in holders[pair]]
                holders[pair] += (min(free, key=lambda w: (load[w], w)),)
        return PlacementPlan(self.num_workers, self.num_layers, self.num_experts, holders)

    def without_worker(self, worker: int) -> "PlacementPlan":
        """The plan once `worker` is gone: its copies are dropped, an expert left with no holder goes
        to the least-loaded survivor, and workers after it move down one index."""
        if self.num_workers < 2:
            raise PlacementError("the last worker cannot go: every expert needs a holder")
        renumber = {w: w - (w > worker) for w in range(self.num_workers) if w != worker}
        holders = {p: tuple(renumber[w] for w in ws if w != worker) for p, ws in self.holders.items()}
        smaller = PlacementPlan(self.num_workers - 1, self.num_layers, self.num_experts, holders)
        for pair in sorted(p for p, ws in holders.items() if not ws):
            load = smaller._load(holders)
            holders[pair] = (min(range(smaller.num_workers), key=lambda w: (load[w], w)),)
        return PlacementPlan(self.num_workers - 1, self.num_layers, self.num_experts, holders)

    def with_new_worker(self) -> "PlacementPlan":
        """One more worker, and single-copy experts moved to it from the busiest workers until it
        holds its share (a copy moves, it is not duplicated: no expert gains or loses copies)."""
        workers = self.num_workers + 1
        holders = dict(self.holders)
        share = sum(len(ws) for ws in holders.values()) // workers
        new = self.num_workers
        bigger = PlacementPlan(workers, self.num_layers, self.num_experts, holders)
        while sum(new in ws for ws in holders.values()) < share:
            load = bigger._load(holders)
            busiest = max(range(self.num_workers), key=lambda w: (load[w], -w))
            movable = sorted(p for p, ws in holders.items() if busiest in ws and new not in ws)
            if not movable:
                break
            pair = movable[0]
            holders[pair] = tuple(new if w == busiest else w for w in holders[pair])
        return PlacementPlan(workers, self.num_layers, self.num_experts, holders)

    def renumbered(self, order: list[int]) -> "PlacementPlan":
        """This plan with its workers in `order`: worker j of the result holds what worker order[j]
        holds here (a permutation of 0..num_workers-1). Puts new workers in lost workers' places."""
        if sorted(order) != list(range(self.num_workers)):
            raise PlacementError(f"{order} is not an order of this plan's {self.num_workers} workers")
        new_index = {w: j for j, w in enumerate(order)}
        holders = {p: tuple(new_index[w] for w in ws) for p, ws in self.holders.items()}
        return PlacementPlan(self.num_workers, self.num_layers, self.num_experts, holders)

    def moves_from(self, old: "PlacementPlan", old_index: dict[int, int]) -> tuple[dict, dict]:
        """What changing from `old` to this plan asks of each worker: (loads, drops), each
        worker index of this plan -> its (layer, expert) pairs. old_index maps this plan's worker
        indices to the old plan's (absent: a new worker, which loads all it holds)."""
        loads, drops = {}, {}
        for w in range(self.num_workers):
            mine = set(self.worker_pairs(w))
            before = set(old.worker_pairs(old_index[w])) if w in old_index else set()
            loads[w], drops[w] = sorted(mine - before), sorted(before - mine)
        return loads, drops

    def to_json(self) -> str:
        return json.dumps({"num_workers": self.num_workers, "num_layers": self.num_layers,
                           "num_experts": self.num_experts,
                           "holders": [[l, e, list(ws)] for (l, e), ws in sorted(self.holders.items())]})

    @classmethod
    def from_json(cls, text: str) -> "PlacementPlan":
        raw = json.loads(text)
        holders = {(l, e): tuple(ws) for l, e, ws in raw["holders"]}
        return cls(raw["num_workers"], raw["num_layers"], raw["num_experts"], holders)

    @classmethod
    def from_file(cls, path: str | Path) -> "PlacementPlan":
        return cls.from_json(Path(path).read_text())

    def min_copies(self) -> int:
        return min(len(ws) for ws in self.holders.values())

    def describe(self, expert_bytes: int | None = None) -> str:
        lines = []
        for w in range(self.num_workers):
            pairs = self.worker_pairs(w)
            replicated = sum(len(self.holders[p]) > 1 for p in pairs)
            size = f", {gib(len(pairs) * expert_bytes)}" if expert_bytes else ""
            lines.append(f"worker {w}: {len(pairs)} experts ({replicated} replicated{size}): "
                         + " ".join(f"{l}:{e}" for l, e in pairs))
        return "\n".join(lines)
