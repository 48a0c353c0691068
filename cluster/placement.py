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

    def validate(self, bytes_per_expert: int | None = None, worker_budget_bytes: int | None = None) -> None:
        """Every expert covered by distinct, existing workers; no worker over its memory budget."""
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
        if bytes_per_expert is not None and worker_budget_bytes is not None:
            for w in range(self.num_workers):
                need = len(self.worker_pairs(w)) * bytes_per_expert
                if need > worker_budget_bytes:
                    raise PlacementError(f"worker {w} needs {need} bytes for its experts, "
                                         f"over its budget of {worker_budget_bytes}")

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

    def describe(self) -> str:
        lines = []
        for w in range(self.num_workers):
            pairs = self.worker_pairs(w)
            replicated = sum(len(self.holders[p]) > 1 for p in pairs)
            lines.append(f"worker {w}: {len(pairs)} experts ({replicated} replicated): "
                         + " ".join(f"{l}:{e}" for l, e in pairs))
        return "\n".join(lines)
