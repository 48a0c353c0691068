"""Prefill against this machine's arithmetic peaks, in one run: one prompt's prefill step at Mixtral
8x7B's layer sizes for fp32, int8 and int4 weights, and on the tiny model at 1k and 4k tokens.

    python bench/prefill.py [--mixtral-layers 1 --prompts 256,1024 --quantize none,int8,int4]

Peaks (core/cpu_kernels.c, measured here on `--threads` threads, registers only, before each mode and
at the end; the ratios are over the highest seen): fp32 FMAs, and 8-bit unsigned x signed products
summed into int32 (vpdpbusd where the CPU has VNNI, else vpmaddubsw + vpmaddwd, as llama.cpp's 8-bit
dot products run). A prefill's multiply-adds are its
weights' (attention projections, gate, each token's k experts; the lm_head once, for the last
token) times the tokens; attention's own products (which grow with the prompt) are counted apart.
fp32 is set against the FMA peak, int8, w8a8, int4 and w4a8 against the byte peak (what llama.cpp's 8-
and 4-bit prompt processing runs at). The tiny model (hidden 512, 4 layers) runs 1k and 4k-token prompts,
interleaved, the best of at least three each: a long prompt's tokens/s over a short one's shows what
attention's growth costs. Beside it, the ratio were attention's multiply-adds as fast as the
weights' (at hidden 512 attention's own products are a third of the weights' at 4k, so the 0.9
target asks attention to run faster per multiply-add than the small GEMMs), and the same two lengths
on the Mixtral-size layer (`--mixtral-long`, in `--long-quantize`), where attention's share is a few
percent.

Last line: prefill_int8_over_peak=<a> prefill_w8a8_over_peak=<b> prefill_int4_over_peak=<c>
prefill_w4a8_over_peak=<d> prefill_f32_over_fma_peak=<e> prefill_4k_over_1k=<f>
prefill_4k_over_1k_equal_rates=<g> prefill_4k_over_1k_mixtral=<h> (a-e at the longest --prompts).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from raw_steps import release, step  # noqa: E402

from expertmesh.core import cpu_kernels  # noqa: E402
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402
from expertmesh.router.engine import Engine, Sequence  # noqa: E402

MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
               max_position_embeddings=32768)
TINY = dict(hidden_size=512, intermediate_size=1792, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
            max_position_embeddings=8192)


def weight_macs(config, tokens: int) -> int:
    """Multiply-adds of a prefill of `tokens` tokens against the weights."""
    c = config
    attention = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * \
        c.hidden_size
    per_token = c.num_layers * (attention + c.hidden_size * c.num_experts
                                + c.experts_per_token * 3 * c.hidden_size * c.intermediate_size)
    return tokens * per_token + c.vocab_size * c.hidden_size  # the lm_head, once


def attention_macs(config, tokens: int) -> int:
    """Attention's own multiply-adds (q.k and p.v, causal) over a prompt of `tokens`."""
    return config.num_layers * config.num_heads * config.head_dim * tokens * (tokens + 1)


def prefill_s(engine: Engine, tokens: int, repeats: int) -> float:
    """Best time of one prefill step of one `tokens`-token prompt (a fresh sequence each time), after
    an untimed short one (the first step of an engine pays for its threads and buffers)."""
    warm = Sequence([1] + list(range(3, 18)))
    step(engine, [warm])
    release(engine, [warm])
    times = []
    for r in range(repeats):
        seq = Sequence([1] + [(100 + 7 * i + r) % 30000 + 3 for i in range(tokens - 1)])
        start = time.perf_counter()
        step(engine, [seq])
        times.append(time.perf_counter() - start)
        release(engine, [seq])
    return min(times)


def long_over_short(engine: Engine, name: str, lengths: list[int], rounds: int) -> tuple[float, float]:
    """The longest prompt's tokens/s over the shortest's, prompts interleaved, the best of `rounds`
    each (a drift of the machine between them read as 0.75 one run and 1.12 the next with one of
    each); and that ratio were attention's products as fast as the weights'."""
    best = {tokens: float("inf") for tokens in lengths}
    for _ in range(rounds):
        for tokens in lengths:
            best[tokens] = min(best[tokens], prefill_s(engine, tokens, 1))
    rates, costs = [], []  # tokens/s; multiply-adds a token, the weights' and attention's
    for tokens in lengths:
        weights, attention = weight_macs(engine.config, tokens), attention_macs(engine.config, tokens)
        rates.append(tokens / best[tokens])
        costs.append((weights + attention) / tokens)
        print(f"{name}, {tokens} tokens: {best[tokens] * 1e3:.0f} ms, {rates[-1]:.0f} tokens/s "
              f"(attention's own multiply-adds {attention / weights:.0%} of the weights')", flush=True)
    ratio, equal_rates = rates[-1] / rates[0], costs[0] / costs[-1]
    print(f"{name}: {lengths[-1]} tokens at {ratio:.2f}x the tokens/s of {lengths[0]}; at equal rates per "
          f"multiply-add, {equal_rates:.2f}x", flush=True)
    return ratio, equal_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtral-layers", type=int, default=1)
    parser.add_argument("--prompts", default="256,1024", help="prompt lengths at Mixtral's sizes (default 256,1024)")
    parser.add_argument("--quantize", default="none,int8,w8a8,int4,w4a8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long", default="1024,4096", help="the tiny model's prompt lengths (default 1024,4096)")
    parser.add_argument("--mixtral-long", default="1024,4096",
                        help="the same on the Mixtral-size layer ('' to skip; default 1024,4096)")
    parser.add_argument("--long-quantize", default="w4a8", help="the Mixtral-size layer's mode for --mixtral-long")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.kernels()
    assert kernels is not None, "the CPU kernels did not build here"
    # This VM's speed drifts between runs and within one: the peaks are measured again before each
    # mode, and every ratio is taken over the highest seen in the run (a slow moment while measuring a
    # peak could otherwise only flatter the ratios).
    peaks = {"fma": 0.0, "dot": 0.0}

    def measure_peaks() -> None:
        for kind in peaks:
            peaks[kind] = max(peaks[kind], kernels.peak(kind, args.threads))

    measure_peaks()
    print(f"machine: {machine()}; {args.threads} threads; peaks: fp32 FMA {peaks['fma'] / 1e9:.0f} G, "
          f"8-bit dot {peaks['dot'] / 1e9:.0f} G multiply-adds/s", flush=True)
    prompts = [int(p) for p in args.prompts.split(",")]
    speeds: dict[str, float] = {}  # weight multiply-adds a second at the longest prompt
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        path = write_tiny_checkpoint(Path(tmp) / "mixtral", dtype="bfloat16", max_shard_bytes=2 << 30,
                                     num_layers=args.mixtral_layers, **MIXTRAL)
        print(f"Mixtral 8x7B sizes, {args.mixtral_layers} layer(s), written in {time.monotonic() - start:.0f}s",
              flush=True)
        for quantize in args.quantize.split(","):
            engine = Engine.local(path, kv_blocks=(max(prompts) // 16 + 2) * args.repeats, quantize=quantize)
            measure_peaks()
            kind = "fma" if quantize == "none" else "dot"
            for tokens in prompts:
                took = prefill_s(engine, tokens, args.repeats)
                macs = weight_macs(engine.config, tokens)
                print(f"{quantize:>5} {tokens:>5} tokens: {took * 1e3:8.0f} ms, {tokens / took:7.0f} tokens/s, "
                      f"{macs / took / 1e9:6.1f} G weight multiply-adds/s = {macs / took / peaks[kind]:.3f} of the "
                      f"{'FMA' if kind == 'fma' else 'byte'} peak so far, {peaks[kind] / 1e9:.0f} G (attention's own: "
                      f"{attention_macs(engine.config, tokens) / macs:.1%} more)", flush=True)
                speeds[quantize] = macs / took
            del engine
            gc.collect()
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny", **TINY)
        lengths = [int(n) for n in args.long.split(",")]
        engine = Engine.local(tiny, kv_blocks=max(lengths) // 16 + 2)
        long_ratio, equal_rates = long_over_short(engine, "tiny model, fp32", lengths, max(args.repeats, 3))
        del engine
        mixtral_ratio = float("nan")
        if args.mixtral_long:
            lengths = [int(n) for n in args.mixtral_long.split(",")]
            engine = Engine.local(path, kv_blocks=max(lengths) // 16 + 2, quantize=args.long_quantize)
            mixtral_ratio, _ = long_over_short(engine, f"Mixtral-size layer, {args.long_quantize}", lengths,
                                               max(args.repeats, 2))
            del engine
            gc.collect()
    measure_peaks()
    print(f"peaks, the highest seen in this run: fp32 FMA {peaks['fma'] / 1e9:.0f} G, "
          f"8-bit dot {peaks['dot'] / 1e9:.0f} G")
    ratios = {quantize: rate / peaks["fma" if quantize == "none" else "dot"] for quantize, rate in speeds.items()}
    print(f"prefill_int8_over_peak={ratios.get('int8', float('nan')):.3f} "
          f"prefill_w8a8_over_peak={ratios.get('w8a8', float('nan')):.3f} "
          f"prefill_int4_over_peak={ratios.get('int4', float('nan')):.3f} "
          f"prefill_w4a8_over_peak={ratios.get('w4a8', float('nan')):.3f} "
          f"prefill_f32_over_fma_peak={ratios.get('none', float('nan')):.3f} "
          f"prefill_4k_over_1k={long_ratio:.2f} prefill_4k_over_1k_equal_rates={equal_rates:.2f} "
          f"prefill_4k_over_1k_mixtral={mixtral_ratio:.2f}")


if __name__ == "__main__":
    main()
