"""GPU check of the reference engine at real Mixtral 8x7B layer sizes (hidden 4096, intermediate
14336, 32 heads / 8 kv heads, 8 experts top-2, vocab 32000; a few layers), bf16, against
transformers' MixtralForCausalLM on the same weights: greedy agreement and decode tokens/s; and
batch 1 with and without CUDA graphs against the HBM roofline (the bytes a step reads: dense weights,
lm_head and the two experts per layer, over the bandwidth of a large device copy, read + written).

    python bench/engine_gpu.py [--layers 2]      # needs one CUDA GPU
Last line: reference_over_transformers_decode_tokens_per_s_b16=<x> b1_graphs_over_hbm_roofline=<y>
graphs_tokens_equal_eager=<prompts whose greedy tokens with replayed graphs equal the eager path's>/<of>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raw_steps import greedy, prompt_logits, release, step  # noqa: E402

from expertmesh.core.config import MixtralConfig  # noqa: E402
from expertmesh.core.tiny_checkpoint import random_weights, save_hub  # noqa: E402
from expertmesh.router.engine import Engine, Sequence  # noqa: E402


def our_decode_tokens_per_s(engine: Engine, batch: int, prompt_len: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(batch)
    seqs = [Sequence(torch.randint(3, 32000, (prompt_len,), generator=gen).tolist()) for _ in range(batch)]
    step(engine, seqs)
    for s in seqs:
        s.token_ids.append(7)
    step(engine, seqs)  # warm-up decode
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        for s in seqs:
            s.token_ids.append(7)
        step(engine, seqs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    release(engine, seqs)
    return batch * steps / elapsed


def hf_decode_tokens_per_s(model, batch: int, prompt_len: int, steps: int) -> float:
    ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start - prefill  # decode steps only
    return batch * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    from transformers import MixtralForCausalLM

    config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=args.layers,
                           num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, experts_per_token=2,
                           dtype="bfloat16")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"layers={args.layers} bf16")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_hub(random_weights(config, seed=0, dtype=torch.bfloat16), config, Path(tmp), 4 << 30)
        print(f"wrote the checkpoint in {time.perf_counter() - start:.1f}s")
        engine = Engine.local(tmp, torch.bfloat16, kv_blocks=2048, device="cuda")
        hf = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
        prompt = torch.randint(3, 32000, (1, 24), generator=torch.Generator().manual_seed(1))
        ours = greedy(engine, [prompt[0].tolist()], 32)[0]
        with torch.no_grad():
            theirs = hf.generate(prompt.cuda(), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 24:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        logits_ours = prompt_logits(engine, prompt[0].tolist())
        with torch.no_grad():
            logits_hf = hf(prompt.cuda()).logits[0].float().cpu()
        print(f"greedy: first {agree} of 32 tokens identical (bf16); prefill logits max abs diff "
              f"{(logits_ours - logits_hf).abs().max().item():.3f} (logit scale {logits_hf.abs().max().item():.1f})")
        ratios = {}
        print(f"{'batch':>5} {'ours tok/s':>10} {'transformers tok/s':>18} {'ratio':>6}")
        for batch in (1, 16, 64):
            ours_tps = our_decode_tokens_per_s(engine, batch, 128, args.steps)
            hf_tps = hf_decode_tokens_per_s(hf, batch, 128, args.steps)
            ratios[batch] = ours_tps / hf_tps
            print(f"{batch:>5} {ours_tps:>10.1f} {hf_tps:>18.1f} {ratios[batch]:>6.2f}")
        # batch 1 against the HBM roofline, with the decode step's CUDA graphs and without
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
        hbm = 2 * 10 * src.numel() / (time.perf_counter() - start)  # bytes/s, read + written
        del src, dst
        c, m = config, engine.model
        dense = sum(w.qkv.nbytes + w.o.nbytes + w.gate.nbytes for w in m.layers) + m.lm_head.nbytes
        step_bytes = dense + c.num_layers * 2 * 3 * c.intermediate_size * c.hidden_size * 2  # bf16 experts
        roofline_s = step_bytes / hbm
        plain = Engine.local(tmp, torch.bfloat16, kv_blocks=256, device="cuda", graphs=False)
        # replayed graphs against the eager path on the same weights: the same greedy tokens (bf16:
        # the grouped GEMM sums in another order, so a near-tie may tip; the first difference is shown)
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (5, 17, 40, 64)]
        replays = engine.graphs.replays
        with_graphs, eager = greedy(engine, prompts, 24), greedy(plain, prompts, 24)
        same = sum(a == b for a, b in zip(with_graphs, eager))
        firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(with_graphs, eager)]
        print(f"graphs against eager: {same} of {len(prompts)} prompts' 24 greedy tokens identical (first "
              f"difference at {firsts}), {engine.graphs.replays - replays} replays")
        graphs_tps = our_decode_tokens_per_s(engine, 1, 128, args.steps)
        plain_tps = our_decode_tokens_per_s(plain, 1, 128, args.steps)
        print(f"batch 1: HBM {hbm / 1e12:.2f} TB/s (copy), a step reads {step_bytes / 1e9:.2f} GB: roofline "
              f"{roofline_s * 1e3:.3f} ms; graphs {1e3 / graphs_tps:.3f} ms ({graphs_tps * roofline_s:.2f} of it, "
              f"{engine.graphs.replays} replays), no graphs {1e3 / plain_tps:.3f} ms ({plain_tps * roofline_s:.2f})")
    print(f"reference_over_transformers_decode_tokens_per_s_b16={ratios[16]:.2f} "
          f"b1_graphs_over_hbm_roofline={graphs_tps * roofline_s:.2f} graphs_tokens_equal_eager={same}/{len(prompts)}")


if __name__ == "__main__":
    main()
