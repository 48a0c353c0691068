"""The CPU path's speed in one line: prefill against this machine's peaks, int4 decode against its
memory roofline, and int4's serving throughput against int8's, each measured briefly by the
benchmark that owns it (run as subprocesses, one at a time, on this machine).

    python bench/cpu_speed.py

  - bench/prefill.py --prompts 1024 --repeats 1: one Mixtral-size layer's prefill over the byte and
    FMA peaks, and a 4k-token prompt's tokens/s over a 1k one's, on the tiny model and (w4a8) on the
    Mixtral-size layer;
  - bench/latency.py --mixtral-layers 1 --workers 0 --quantize int8,int4,w4a8 --batches 1 --repeats 1:
    decode of one sequence over the roofline of the bytes it reads;
  - here: the serving loop in process (bench/serve.py's `ours`), 32 requests at once of mixed
    lengths, int4, int8, w4a8, then int4 again (the machine drifts: the two int4 runs' mean).

Last line: prefill_int8_over_peak=<a> prefill_int4_over_peak=<b> prefill_4k_over_1k=<c>
int4_b1_roofline=<d> int4_over_int8_c32=<e>, then the byte-activation modes' prefill_w8a8_over_peak,
prefill_w4a8_over_peak, w4a8_b1_roofline and w4a8_over_int8_c32, and prefill_4k_over_1k_mixtral.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import ours, workload  # noqa: E402

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402
from expertmesh.core.tokenizer import load_tokenizer  # noqa: E402
from expertmesh.router.engine import Engine  # noqa: E402

TINY = dict(hidden_size=512, intermediate_size=1792, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)


def last_line_of(script: str, *args: str) -> dict[str, float]:
    """Run bench/`script` with `args`, echo its output, and read `name=value` pairs off its last line."""
    run = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=3600,
                         cwd=HERE)
    print(run.stdout, end="", flush=True)
    if run.returncode:
        raise SystemExit(f"{script} failed:\n{run.stderr[-3000:]}")
    last = run.stdout.strip().splitlines()[-1]
    return {name: float(value) for name, value in re.findall(r"(\w+)=([-\d.na]+)", last)}


def serving_over_int8(concurrency: int = 32) -> dict[str, float]:
    """int4's and w4a8's tokens/s over int8's through the serving loop."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, **TINY)
        tokenizer = load_tokenizer(path)
        requests = workload(concurrency, seed=3)
        rates = {}
        for quantize in ("int4", "int8", "w4a8", "int4"):
            rate, _ = ours(Engine.local(path, kv_blocks=2048, quantize=quantize), tokenizer, requests, concurrency)
            rates.setdefault(quantize, []).append(rate)
            print(f"serving, {quantize}, c{concurrency}: {rate:.0f} tokens/s", flush=True)
    return {"int4": sum(rates["int4"]) / len(rates["int4"]) / rates["int8"][0],
            "w4a8": rates["w4a8"][0] / rates["int8"][0]}


def main() -> None:
    prefill = last_line_of("prefill.py", "--prompts", "1024", "--repeats", "1")
    latency = last_line_of("latency.py", "--mixtral-layers", "1", "--workers", "0", "--quantize", "int8,int4,w4a8",
                           "--batches", "1", "--repeats", "1")
    ratio = serving_over_int8()
    print(f"prefill_int8_over_peak={prefill['prefill_int8_over_peak']:.3f} "
          f"prefill_int4_over_peak={prefill['prefill_int4_over_peak']:.3f} "
          f"prefill_4k_over_1k={prefill['prefill_4k_over_1k']:.2f} "
          f"int4_b1_roofline={latency['decode_b1_int4_over_roofline']:.2f} int4_over_int8_c32={ratio['int4']:.2f} "
          f"prefill_w8a8_over_peak={prefill['prefill_w8a8_over_peak']:.3f} "
          f"prefill_w4a8_over_peak={prefill['prefill_w4a8_over_peak']:.3f} "
          f"w4a8_b1_roofline={latency['decode_b1_w4a8_over_roofline']:.2f} w4a8_over_int8_c32={ratio['w4a8']:.2f} "
          f"prefill_4k_over_1k_mixtral={prefill['prefill_4k_over_1k_mixtral']:.2f}")


if __name__ == "__main__":
    main()
