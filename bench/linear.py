"""Linear layers at this project's CPU shapes: oneDNN with prepacked weights (core/linear.py)
against torch's default F.linear, in one run.

    python bench/linear.py

Shapes (out, in): the tiny model's qkv, expert w13 and w2, a 512/1792 expert (bench/dispatch.py)
and the 32000-token lm_head, at 1, 8, 32 and 128 rows. Last line: packed_over_default_lm_head_b32=<x>.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from expertmesh.core.linear import Linear

SHAPES = ((384, 256), (1024, 256), (256, 512), (3584, 512), (512, 1792), (32000, 256))
ROWS = (1, 8, 32, 128)


def median_ms(fn, repeats: int = 50) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; "
          "cells: default ms / packed ms (ratio)")
    print(f"{'out x in':>12} " + " ".join(f"{f'{m} rows':>22}" for m in ROWS))
    ratio = {}
    for out_f, in_f in SHAPES:
        weight = torch.randn(out_f, in_f) / in_f ** 0.5
        packed = Linear(weight)
        assert packed.weight is None, "oneDNN prepacking is not available in this torch build"
        cells = []
        for m in ROWS:
            x = torch.randn(m, in_f)
            err = (packed(x) - F.linear(x, weight)).abs().max().item()
            assert err < 1e-4, f"packed result differs by {err}"
            default, fast = median_ms(lambda: F.linear(x, weight)), median_ms(lambda: packed(x))
            ratio[(out_f, m)] = fast / default
            cells.append(f"{default:7.3f} / {fast:7.3f} ({fast / default:4.2f})")
        print(f"{out_f:>6} x {in_f:<4} " + " ".join(f"{c:>22}" for c in cells))
    print(f"packed_over_default_lm_head_b32={ratio[(32000, 32)]:.2f}")


if __name__ == "__main__":
    main()
