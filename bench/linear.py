"""Linear layers at this project's CPU shapes: torch's default F.linear, oneDNN on prepacked weights,
and `Linear` (core/linear.py: core/cpu_kernels.c's kernel over its blocked layout, the one copy it
holds) in fp32 and in int8, in one run.

    python bench/linear.py

Shapes (out, in): the tiny model's qkv, expert w13 and w2, the 512/1792 model's (bench/latency.py),
and the 32000-token lm_head, at 1, 2, 4, 8, 32 and 128 rows. Decode reads each weight once per step,
so every call here reads a weight that is not in cache: each shape cycles through enough copies to
pass the last-level cache. A cell is GB/s of fp32 weight bytes (4 per entry, whatever is held: for
int8 that is 4x the bytes actually read), higher is better: default / packed / Linear / Linear int8.
Last line: linear_over_packed_lm_head_b1=<x> linear_over_packed_b32=<y> (the geometric mean over the
shapes at 32 rows) int8_over_fp32_b1=<z> (likewise, at one row)
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from expertmesh.core import cpu_kernels
from expertmesh.core.linear import Linear

SHAPES = ((384, 256), (1024, 256), (256, 512), (768, 512), (3584, 512), (512, 1792), (32000, 512))
ROWS = (1, 2, 4, 8, 32, 128)
COLD_BYTES = 160 << 20  # copies of a weight cycled through per call: five times a 32 MiB L3


def gb_per_s(fn, weights: list, repeats: int = 9) -> float:
    """fp32 weight bytes per second by fn(weight) over all copies, best of repeats."""
    fn(weights[0])
    nbytes = sum(w.numel() * 4 for w in weights)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    torch.manual_seed(0)
    assert cpu_kernels.kernels() is not None, "the CPU kernels did not build here (see the log)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells: GB/s of fp32 weight bytes, "
          "default / packed / Linear / Linear int8")
    print(f"{'out x in':>12} " + " ".join(f"{f'{m} rows':>24}" for m in ROWS))
    results = {}
    for out_f, in_f in SHAPES:
        copies = max(2, COLD_BYTES // (out_f * in_f * 4))
        plain = [torch.randn(out_f, in_f) / in_f ** 0.5 for _ in range(copies)]
        packed = {id(w): Linear(w, kernels=None) for w in plain}
        ours = {id(w): Linear(w) for w in plain}
        int8 = {id(w): Linear(w, "int8") for w in plain}
        cells = []
        for m in ROWS:
            x = torch.randn(m, in_f)
            expected = F.linear(x, plain[0])
            for layer in (packed[id(plain[0])], ours[id(plain[0])]):
                assert (layer(x) - expected).abs().max().item() < 1e-4, "a path disagrees with F.linear"
            row = (gb_per_s(lambda w: F.linear(x, w), plain), gb_per_s(lambda w: packed[id(w)](x), plain),
                   gb_per_s(lambda w: ours[id(w)](x), plain), gb_per_s(lambda w: int8[id(w)](x), plain))
            results[(out_f, m)] = row
            cells.append("/".join(f"{v:.0f}" for v in row))
        print(f"{out_f:>6} x {in_f:<4} " + " ".join(f"{c:>24}" for c in cells), flush=True)
    lm_head = results[(32000, 1)]
    at_32 = geomean([results[(s[0], 32)][2] / results[(s[0], 32)][1] for s in SHAPES])
    int8_b1 = geomean([results[(s[0], 1)][3] / results[(s[0], 1)][2] for s in SHAPES])
    print(f"linear_over_packed_lm_head_b1={lm_head[2] / lm_head[1]:.2f} linear_over_packed_b32={at_32:.2f} "
          f"int8_over_fp32_b1={int8_b1:.2f}")


if __name__ == "__main__":
    main()
