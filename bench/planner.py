"""The replica planner (cluster/planner.py) against DeepSeek's EPLB global policy, on skewed loads.

    python bench/planner.py [--workers 4 --slots 3 --layers 32]

EPLB's global policy, as its README and code describe it (re-implemented here for the comparison):
replicate the expert with the most load per copy until the slots are full, then pack the copies,
heaviest first, onto the least loaded GPU that has a free slot, from scratch every time. Ours starts
from the current plan. Loads (8 experts per layer, Mixtral's 32 layers): Zipf (s = 1.2, a random
order per layer), one hot expert per layer (40% of the rows), and hot spots that shift over five
rounds (each plan starts from the one before). Balance: the mean over layers of the busiest
worker's load over the mean worker's (1.0 is perfect); moves: expert copies a worker must load.
Both place an expert's copies on distinct workers, because this router splits an expert's rows
evenly among its holders; EPLB's own packing may put two copies on one GPU (an uneven split), and
that variant's balance is printed too.
Last line: balance_ours=<x> balance_eplb=<y> moves_ours=<n> moves_eplb=<m> (over all scenarios).
"""

from __future__ import annotations

import argparse
import random

from expertmesh.cluster.placement import PlacementPlan
from expertmesh.cluster.planner import balance, moves, plan, replica_counts

EXPERTS = 8


def eplb_layer(loads: list[float], workers: int, slots: int, distinct: bool) -> list[list[int]]:
    """EPLB's global policy for one layer: expert -> the worker of each of its copies. distinct:
    never two copies of an expert on one worker (what this router executes: it splits an expert's
    rows evenly among distinct holders; EPLB's two copies on one GPU are an uneven split)."""
    copies = [min(c, workers) if distinct else c for c in replica_counts(loads, workers * slots)]
    items = sorted(((loads[e] / copies[e], e) for e in range(len(loads)) for _ in range(copies[e])), reverse=True)
    weight, count = [0.0] * workers, [0] * workers
    placed: list[list[int]] = [[] for _ in loads]
    for share, e in items:
        w = min((w for w in range(workers) if count[w] < slots and not (distinct and w in placed[e])),
                key=lambda w: (weight[w], w))
        weight[w] += share
        count[w] += 1
        placed[e].append(w)
    return placed


def eplb(load: dict, current: PlacementPlan, slots: int, distinct: bool = True) -> tuple[float, int, dict]:
    """(balance, moves, holders) of EPLB's plan."""
    ratios, moved, holders = [], 0, {}
    for layer in range(current.num_layers):
        loads = [load[(layer, e)] for e in range(EXPERTS)]
        placed = eplb_layer(loads, current.num_workers, slots, distinct)
        per = [0.0] * current.num_workers
        for e, ws in enumerate(placed):
            for w in ws:
                per[w] += loads[e] / len(ws)
            moved += len(set(ws) - set(current.holders[(layer, e)]))
            holders[(layer, e)] = tuple(sorted(set(ws)))
        ratios.append(max(per) / (sum(per) / len(per)))
    return sum(ratios) / len(ratios), moved, holders


def zipf(rng: random.Random, layers: int, s: float = 1.2) -> dict:
    load = {}
    for layer in range(layers):
        order = list(range(EXPERTS))
        rng.shuffle(order)
        for rank, e in enumerate(order):
            load[(layer, e)] = 1000 / (rank + 1) ** s
    return load


def one_hot(rng: random.Random, layers: int, hot: int | None = None) -> dict:
    load = {}
    for layer in range(layers):
        h = rng.randrange(EXPERTS) if hot is None else (hot + layer) % EXPERTS
        for e in range(EXPERTS):
            load[(layer, e)] = 400 if e == h else 600 / (EXPERTS - 1)
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=3, help="expert slots per worker per layer")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    rng = random.Random(0)
    start = PlacementPlan.spread(args.workers, args.layers, EXPERTS)
    scenarios = {"zipf": [zipf(rng, args.layers)], "one hot": [one_hot(rng, args.layers)],
                 "shifting hot spots": [one_hot(rng, args.layers, hot=round_ * 3) for round_ in range(5)]}
    totals = {"ours": [0.0, 0], "eplb": [0.0, 0], "eplb shared": [0.0, 0]}
    rounds = 0
    print(f"{args.workers} workers x {args.slots} slots per layer, {args.layers} layers x {EXPERTS} experts")
    print(f"{'scenario':>20} {'round':>5} {'no change':>9} {'ours':>6} {'eplb':>6} {'moves ours':>10} "
          f"{'moves eplb':>10} {'eplb, shared GPUs':>17}")
    for name, loads in scenarios.items():
        ours_plan = eplb_plan = start
        for round_, load in enumerate(loads):
            new = plan(load, ours_plan, args.slots)
            b_ours, m_ours = balance(new, load), moves(ours_plan, new)
            b_eplb, m_eplb, holders = eplb(load, eplb_plan, args.slots)
            b_shared, _, _ = eplb(load, eplb_plan, args.slots, distinct=False)
            print(f"{name:>20} {round_:>5} {balance(ours_plan, load):>9.3f} {b_ours:>6.3f} {b_eplb:>6.3f} "
                  f"{m_ours:>10} {m_eplb:>10} {b_shared:>17.3f}")
            totals["eplb shared"][0] += b_shared
            ours_plan = new
            eplb_plan = PlacementPlan(args.workers, args.layers, EXPERTS, holders)
            totals["ours"][0] += b_ours
            totals["ours"][1] += m_ours
            totals["eplb"][0] += b_eplb
            totals["eplb"][1] += m_eplb
            rounds += 1
    print(f"EPLB with two copies of an expert allowed on one GPU (an uneven split, which this router "
          f"does not do): balance {totals['eplb shared'][0] / rounds:.3f}")
    print(f"balance_ours={totals['ours'][0] / rounds:.3f} balance_eplb={totals['eplb'][0] / rounds:.3f} "
          f"moves_ours={totals['ours'][1]} moves_eplb={totals['eplb'][1]}")


if __name__ == "__main__":
    main()
