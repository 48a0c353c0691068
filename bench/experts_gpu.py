"""GPU check of the expert path at real Mixtral 8x7B dimensions (hidden 4096, intermediate 14336,
8 experts, top-2, bf16): the Triton grouped kernel against the torch per-expert path, correctness
and speed; the same kernel over int8, fp8 (e4m3) and int4 stacks (--quantize int8 / fp8 / int4)
against it over bf16 at 1-1024 tokens; and an NCCL process group (the transport's backend) on one rank.

    python bench/experts_gpu.py        # needs one CUDA GPU; prints tables and a last line
Last line: triton_over_torch_moe_speedup_t1024=<x> int8_over_bf16_t1=<y> fp8_over_bf16_t1=<z>
int4_over_bf16_t1=<w> (the quantized ones: bf16's time over theirs at one token, where reading the
weights is the step)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expertmesh.core.grouped_experts import grouped_swiglu  # noqa: E402
from expertmesh.core.grouped_experts_triton import triton_grouped_swiglu  # noqa: E402
from expertmesh.core.moe_math import sort_by_expert  # noqa: E402
from expertmesh.workers.grouped_mlp import LayerExperts  # noqa: E402

D, I, E, K = 4096, 14336, 8, 2
CONFIGS = [(64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 2),
           (64, 256, 64, 8, 2), (16, 128, 128, 4, 3)]  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)


def bench_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def nccl_check() -> str:
    """A one-rank NCCL group built as core/wire.py builds its pairs (a pair needs two GPUs)."""
    import torch.distributed as dist

    from expertmesh.core import wire

    port = 29400 + os.getpid() % 1000
    store = wire.open_store("127.0.0.1", port, True, 60)
    options = dist.ProcessGroupNCCL.Options()
    group = dist.ProcessGroupNCCL(dist.PrefixStore("check/", store), 0, 1, options)
    rows = torch.randn(256, D, device="cuda", dtype=torch.bfloat16)
    before = rows.clone()
    group.allreduce([rows]).wait()
    ok = torch.equal(rows, before)
    ms = bench_ms(lambda: group.allreduce([rows]).wait())
    group.abort()
    return f"nccl allreduce 1 rank 256x{D} bf16: equal={ok} {ms * 1e3:.0f} us"


QUANTIZED = ("int8", "fp8", "int4")


def quantized(experts: dict, gen: torch.Generator) -> dict[str, float]:
    """int8, fp8 and int4 stacks through the Triton kernel against bf16 stacks through it: ms per
    call, and the error against bf16's output. Returns bf16's time over each at one token."""
    layers = {q: LayerExperts.stack(dict(experts), quantize=q) for q in ("none", *QUANTIZED)}
    print(f"{'tokens':>6} {'bf16 ms':>8} " + " ".join(f"{q + ' ms':>8}" for q in QUANTIZED) + " "
          + " ".join(f"{q + ' rel err':>12}" for q in QUANTIZED))
    ratios = {}
    for tokens in (1, 16, 64, 256, 1024):
        x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        _, ids = torch.topk(torch.randn(tokens, E, device="cuda", generator=gen), K)
        order, counts = sort_by_expert(ids, E)
        rows, count_list = x[order // K], counts.tolist()
        used = [e for e in range(E) if count_list[e]]
        used_counts = [count_list[e] for e in used]
        ms, out = {}, {}
        for q, layer in layers.items():
            fn = lambda layer=layer: triton_grouped_swiglu(rows, used, used_counts, layer.w13, layer.w2,  # noqa: E731
                                                           layer.scales)
            out[q], ms[q] = fn().float(), bench_ms(fn)
        err = {q: ((out[q] - out["none"]).abs().max() / out["none"].abs().max()).item() for q in QUANTIZED}
        print(f"{tokens:>6} {ms['none']:>8.3f} " + " ".join(f"{ms[q]:>8.3f}" for q in QUANTIZED) + " "
              + " ".join(f"{err[q]:>12.2e}" for q in QUANTIZED))
        if tokens == 1:
            ratios = {q: ms["none"] / ms[q] for q in QUANTIZED}
    return ratios


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts = {e: (torch.randn(I, D, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02,
                   torch.randn(D, I, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02,
                   torch.randn(I, D, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02)
               for e in range(E)}
    eight = quantized(experts, gen)
    layer = LayerExperts.stack(experts)
    del experts
    print(f"{'tokens':>6} {'torch ms':>9} " + " ".join(f"{'tr' + ','.join(map(str, c)):>16}" for c in CONFIGS)
          + f" {'best TFLOP/s':>12} {'max rel err':>11}")
    speedup = {}
    for tokens in (16, 64, 256, 1024, 4096):
        x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        weights, ids = torch.topk(torch.randn(tokens, E, device="cuda", generator=gen).softmax(-1), K)
        weights = weights / weights.sum(-1, keepdim=True)
        order, counts = sort_by_expert(ids, E)
        rows = x[order // K]
        count_list = counts.tolist()
        per_expert = layer.mlps  # views into the stacks, torch (cuBLAS) per expert
        torch_fn = lambda: grouped_swiglu(rows, count_list, per_expert)  # noqa: E731
        reference = torch_fn().float()
        torch_ms = bench_ms(torch_fn)
        cells, best = [], float("inf")
        err = 0.0
        for bm, bn, bk, warps, stages in CONFIGS:
            fn = lambda: triton_grouped_swiglu(rows, list(range(E)), count_list, layer.w13, layer.w2,  # noqa: E731
                                               block_m=bm, block_n=bn, block_k=bk,
                                               num_warps=warps, num_stages=stages)
            got = fn().float()
            err = max(err, ((got - reference).abs().max() / reference.abs().max()).item())
            ms = bench_ms(fn)
            best = min(best, ms)
            cells.append(f"{ms:>16.3f}")
        flops = 2 * tokens * K * 3 * D * I
        speedup[tokens] = torch_ms / best
        print(f"{tokens:>6} {torch_ms:>9.3f} " + " ".join(cells) + f" {flops / best / 1e9:>12.1f} {err:>11.2e}")
    print(nccl_check())
    print(f"triton_over_torch_moe_speedup_t1024={speedup[1024]:.2f} int8_over_bf16_t1={eight['int8']:.2f} "
          f"fp8_over_bf16_t1={eight['fp8']:.2f} int4_over_bf16_t1={eight['int4']:.2f}")


if __name__ == "__main__":
    main()
