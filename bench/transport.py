"""One layer's round trip on raw gloo, without Ray: three all-to-alls (counts, rows out, rows back)
against point-to-point messages between the router and each worker (core/wire.py).

    python bench/transport.py [--workers 2 --rows 32 --hidden 256 --rounds 400]

Ranks are plain processes on loopback with one torch thread each; the workers double the rows they
get (no expert math), so this times the transport alone. Last line: p2p_over_all_to_all=<x>.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HEADER = 10  # int64 values per header, as for 8 experts


def all_to_all_round(world: int, rows: torch.Tensor) -> None:
    """The old protocol: every rank joins three all_to_all_single calls per layer."""
    workers = world - 1
    per = rows.shape[0] // workers
    counts = torch.full((world * HEADER,), per, dtype=torch.int64)
    split, none = [0] + [per] * workers, [0] * world
    empty = torch.empty(0, rows.shape[1])
    works = [dist.all_to_all_single(torch.empty(world * HEADER, dtype=torch.int64), counts, async_op=True),
             dist.all_to_all_single(empty, rows, none, split, async_op=True),
             dist.all_to_all_single(torch.empty_like(rows), empty, split, none, async_op=True)]
    for work in works:
        work.wait()


def all_to_all_worker(world: int, rank: int, rounds: int, hidden: int) -> None:
    none = [0] * world
    for _ in range(rounds):
        header = torch.empty(world * HEADER, dtype=torch.int64)
        dist.all_to_all_single(header, torch.zeros(world * HEADER, dtype=torch.int64))
        n = int(header[2])
        got = torch.empty(n, hidden)
        dist.all_to_all_single(got, torch.empty(0, hidden), [n] + none[1:], none)
        dist.all_to_all_single(torch.empty(0, hidden), got * 2, none, [n] + none[1:])


def p2p_round(world: int, rows: torch.Tensor) -> None:
    """Now: a header and the rows to each worker, its results back; nothing between workers."""
    per = rows.shape[0] // (world - 1)
    header = torch.full((HEADER,), per, dtype=torch.int64)
    back = torch.empty_like(rows)
    works = []
    for w in range(1, world):
        part = slice((w - 1) * per, w * per)
        works += [dist.isend(header, w), dist.isend(rows[part], w), dist.irecv(back[part], w)]
    for work in works:
        work.wait()


def p2p_worker(world: int, rank: int, rounds: int, hidden: int) -> None:
    for _ in range(rounds):
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.recv(header, 0)
        got = torch.empty(int(header[2]), hidden)
        dist.recv(got, 0)
        dist.send(got * 2, 0)


def rank_main(rank: int, world: int, mode: str, port: int, args, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if rank != 0:
            (p2p_worker if mode == "p2p" else all_to_all_worker)(world, rank, args.rounds, args.hidden)
            return
        rows = torch.randn(args.rows * (world - 1), args.hidden)
        round_trip = p2p_round if mode == "p2p" else all_to_all_round
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            round_trip(world, rows)
            times.append(time.perf_counter() - start)
        results[mode] = statistics.median(times[args.rounds // 10:]) * 1e3
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=32, help="rows per worker per round")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for mode in ("all_to_all", "p2p", "all_to_all", "p2p"):  # interleaved: the machine drifts
        medians = dict(results)
        mp.spawn(rank_main, args=(args.workers + 1, mode, free_port(), args, results), nprocs=args.workers + 1)
        if mode in medians:
            results[mode] = min(results[mode], medians[mode])
    print(f"gloo, {args.workers} workers, {args.rows} rows x {args.hidden} fp32 each way per worker, "
          f"median round trip of one layer (best of 2 runs):")
    for mode in ("all_to_all", "p2p"):
        print(f"  {mode:>10}: {results[mode]:.3f} ms")
    print(f"p2p_over_all_to_all={results['p2p'] / results['all_to_all']:.2f}")


if __name__ == "__main__":
    main()
