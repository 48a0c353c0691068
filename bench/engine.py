"""Tokens/s of the reference engine against transformers' generate, same checkpoint, same run.

    python bench/engine.py [--batch 8] [--new-tokens 64]

Last line: reference_over_transformers_tokens_per_s=<ratio>
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from raw_steps import greedy

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import MixtralForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=256, intermediate_size=512, num_layers=4,
                                     num_heads=8, num_kv_heads=2, head_dim=32)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(0))
        engine = Engine.local(path)
        hf = MixtralForCausalLM.from_pretrained(path).eval()
        tokens = args.batch * args.new_tokens

        def ours():
            greedy(engine, prompts.tolist(), args.new_tokens)

        def theirs():
            with torch.no_grad():
                hf.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False)

        ours_s = timed(ours, args.repeats)
        theirs_s = timed(theirs, args.repeats)
    print(f"batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} threads=1")
    print(f"reference engine: {tokens / ours_s:.1f} tokens/s")
    print(f"transformers generate: {tokens / theirs_s:.1f} tokens/s")
    print(f"reference_over_transformers_tokens_per_s={theirs_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
