"""Structured output's cost to the requests around it: the serving loop's time per step for a batch
of plain greedy streams, against the same batch where some streams follow a grammar (their logits
rows masked by xgrammar before sampling), measured in one run, alternating, on the in-process
engine.

    python bench/structured.py [--plain 16 --constrained 4 --tokens 48 --repeats 3]

Baseline: plain + constrained streams, all plain. Mixed: the constrained ones follow a regex long
enough that no stream ends before --tokens. Both batches have the same size, so the difference is
the masks (and the per-row sampling they force) alone.

Last line: structured_mixed_over_plain_step=<x>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.engine import Engine
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine
from expertmesh.router.structured import StructureSpec

REGEX = "[a-z]{2000}"  # no stream can complete it within --tokens


def step_ms(serving: ServingEngine, plain: int, constrained: int, tokens: int, grammar) -> float:
    """Mean wall time of one serving-loop step while the batch decodes (prefill excluded)."""
    done = threading.Semaphore(0)
    first = threading.Event()
    for i in range(plain + constrained):
        def sink(out, i=i):
            if i == 0 and out.token_ids:
                first.set()
            if out.finish_reason is not None:
                done.release()
        use = grammar if i >= plain else None  # a grammar ends its answer itself: no ignore_eos with it
        params = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=use is None)
        serving.submit(validate_request([1, 100 + i, 200 + i], params, serving.limits, grammar=use), sink)
    first.wait(60)
    steps, start = serving.steps, time.perf_counter()
    for _ in range(plain + constrained):
        done.acquire(timeout=300)
    return (time.perf_counter() - start) * 1e3 / max(serving.steps - steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", type=int, default=16)
    parser.add_argument("--constrained", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_layers=4,
                                     num_heads=8, num_kv_heads=2, head_dim=args.hidden // 8)
        serving = ServingEngine(Engine.local(path), load_tokenizer(path))
        try:
            start = time.perf_counter()
            grammar = serving.grammars.compile(StructureSpec("regex", REGEX))
            print(f"grammar compiled in {time.perf_counter() - start:.2f}s (the tokenizer's tables included)")
            base, mixed = [], []
            for _ in range(args.repeats):  # alternating: the machine's drift hits both alike
                base.append(step_ms(serving, args.plain + args.constrained, 0, args.tokens, None))
                mixed.append(step_ms(serving, args.plain, args.constrained, args.tokens, grammar))
        finally:
            serving.shutdown()
    b, m = statistics.median(base), statistics.median(mixed)
    print(f"{args.plain + args.constrained} streams, {args.tokens} tokens, hidden {args.hidden}, in-process CPU")
    print(f"step ms: all plain {b:.2f} (runs {', '.join(f'{x:.2f}' for x in base)}); "
          f"{args.constrained} constrained {m:.2f} (runs {', '.join(f'{x:.2f}' for x in mixed)})")
    print(f"per constrained row per step: {(m - b) / args.constrained:.3f} ms")
    print(f"structured_mixed_over_plain_step={m / b:.2f}")


if __name__ == "__main__":
    main()
