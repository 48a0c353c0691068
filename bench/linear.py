"""Linear layers at this project's CPU shapes: torch's default F.linear, oneDNN on prepacked weights
and the GEMV kernel of core/cpu_kernels.c, in one run; and which one `Linear` picks.

    python bench/linear.py

Shapes (out, in): the tiny model's qkv, expert w13 and w2, the 512/1792 model's (bench/latency.py),
and the 32000-token lm_head, at 1, 2, 4, 8 and 32 rows. Decode reads each weight once per step, so
every call here reads a weight that is not in cache: each shape cycles through enough copies to pass
the last-level cache, and a cell is GB/s of weights read (higher is better). Last line:
gemv_over_packed_lm_head_b1=<x> packed_over_default_lm_head_b32=<y>
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from expertmesh.core import cpu_kernels
from expertmesh.core.linear import Linear

SHAPES = ((384, 256), (1024, 256), (256, 512), (768, 512), (3584, 512), (512, 1792), (32000, 512))
ROWS = (1, 2, 4, 8, 32)
COLD_BYTES = 160 << 20  # copies of a weight cycled through per call: five times a 32 MiB L3


def gb_per_s(fn, weights: list, repeats: int = 15) -> float:
    """Weight bytes read per second by fn(weight) over all copies, best of repeats."""
    fn(weights[0])
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def main() -> None:
    torch.manual_seed(0)
    kernels = cpu_kernels.kernels()
    assert kernels is not None, "the CPU kernels did not build here (see the log)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; cells: GB/s of weights read, "
          "default / packed / gemv (1-2 rows) -> what Linear picks")
    print(f"{'out x in':>12} " + " ".join(f"{f'{m} rows':>24}" for m in ROWS))
    results = {}
    for out_f, in_f in SHAPES:
        copies = max(2, COLD_BYTES // (out_f * in_f * 4))
        plain = [torch.randn(out_f, in_f) / in_f ** 0.5 for _ in range(copies)]
        packed = {id(w): Linear(w, gemv_kernel=None) for w in plain}
        chosen = {id(w): Linear(w) for w in plain}
        cells = []
        for m in ROWS:
            x = torch.randn(m, in_f)
            expected = F.linear(x, plain[0])
            for layer in (packed[id(plain[0])], chosen[id(plain[0])]):
                assert (layer(x) - expected).abs().max().item() < 1e-4, "a path disagrees with F.linear"
            default = gb_per_s(lambda w: F.linear(x, w), plain)
            pack = gb_per_s(lambda w: packed[id(w)](x), plain)
            gemv = gb_per_s(lambda w: kernels.gemv(x, w), plain) if m <= kernels.max_rows else 0.0
            pick = "gemv" if m <= chosen[id(plain[0])].small_rows else "packed"
            results[(out_f, m)] = (default, pack, gemv)
            gemv_cell = f"{gemv:5.1f}" if gemv else "    -"
            cells.append(f"{default:5.1f}/{pack:5.1f}/{gemv_cell} -> {pick:<6}")
        print(f"{out_f:>6} x {in_f:<4} " + " ".join(f"{c:>24}" for c in cells))
    default, pack, gemv = results[(32000, 1)]
    print(f"gemv_over_packed_lm_head_b1={gemv / pack:.2f} "
          f"packed_over_default_lm_head_b32={results[(32000, 32)][1] / results[(32000, 32)][0]:.2f}")


if __name__ == "__main__":
    main()
