"""Decode latency at small batch against this machine's memory roofline: where a step's time goes.

    python bench/latency.py [--batches 1,8,32 --workers 2 --new-tokens 48 --repeats 3 --quantize int8,int4]

A decode step must read every weight it uses (the router's dense layers and lm_head, the experts its
tokens were routed to) and each sequence's KV context; it cannot run faster than those bytes over the
memory bandwidth. The bandwidth is measured in the same run, as the best of a large copy (bytes
read + written), a large read-only sum and the linear kernel reading a large weight at one row, on
buffers far beyond the last-level cache (the kernel streams faster than the other two here, so it
sets the bar). The step
time is what a client sees: the serving loop (`ServingEngine`) runs B requests of --prompt-len tokens
to --new-tokens each from a fresh KV cache, and a step is the median gap between two streamed
tokens after the first (prefill excluded): scheduling, the model step, sampling, detokenisation and
streaming. Median over --repeats runs.

Then one more run per engine and batch with timers around each part (functions wrapped by this
file, nothing changed in the engine): per layer attention, gate and top-k, the experts' sort,
expert math or dispatch, the wait for the workers and the combine; per step batch building,
lm_head, scheduling, sampling with detokenisation and streaming, and what is left.

Model: hidden 512, intermediate 1792, 4 layers, 8 experts top-2, 8/2 heads of 64, fp32, the real
tokenizer; or with --mixtral-layers N, N layers at Mixtral 8x7B's sizes (hidden 4096, intermediate
14336, 32/8 heads of 128, a 32000-token lm_head), from a bf16 checkpoint, computed in fp32.
Distributed: --workers expert workers on a local Ray (gloo) on the same cores, with --replicas extra
copies if given. --quantize int8 (int4, or both: int8,int4) adds the in-process engine
with those weights (core/quantize.py), whose roofline counts the bytes it holds.
Last line: decode_b1_reference_over_roofline=<x> decode_b1_distributed_over_roofline=<y>, and per
quantized type also decode_b1_int8_over_roofline=<z> int8_over_f32_b1=<w> (tokens/s at batch 1)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from expertmesh.core import cpu_kernels
from expertmesh.core.heap import use_huge_pages
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router import attention, dispatcher, local_experts
from expertmesh.router.engine import Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine

MODEL = dict(hidden_size=512, intermediate_size=1792, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)
# Mixtral 8x7B's own sizes; --mixtral-layers N of its layers (each 5.6 GB of experts in bf16)
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
               max_position_embeddings=32768)


class Bandwidth:
    """This machine's memory bandwidth, in GB/s, measured on buffers far beyond the last-level cache."""

    def __init__(self, mib: int = 512):
        self.src = torch.randn(mib << 18)  # mib MiB of fp32, touched (an untouched buffer reads the zero page)
        self.dst = torch.ones_like(self.src)
        self.kernels = cpu_kernels.kernels()
        if self.kernels is not None:  # any data is a weight in the blocked layout (P, k, panel)
            self.weight, self.row = self.src.view(-1, 1024, self.kernels.panel), torch.randn(1, 1024)

    def measure(self, repeats: int = 5) -> tuple[float, float, float]:
        """Best of repeats: a large copy (bytes read + written), a large sum (bytes read) and the linear
        kernel over a large weight at one row (bytes of weight read; 0 without the kernel)."""
        nbytes = self.src.numel() * 4

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        copy = 2 * nbytes / best(lambda: self.dst.copy_(self.src)) / 1e9
        total = nbytes / best(lambda: self.src.sum()) / 1e9
        outputs = self.weight.shape[0] * self.kernels.panel if self.kernels else 0
        kernel = nbytes / best(lambda: self.kernels.linear(self.row, self.weight, outputs)) / 1e9 if outputs else 0.0
        return copy, total, kernel


def step_bytes(engine: Engine, expert: int, experts_per_layer: float, context_tokens: float, batch: int) -> float:
    """Bytes a decode step of `batch` sequences must read: dense weights (as held: int8 and scales
    when quantized), the experts routed to (distinct per layer, averaged over the steps; `expert` bytes
    each), each sequence's KV context, embedding rows."""
    c, model = engine.config, engine.model
    elem = model.dtype.itemsize
    dense = sum(w.qkv.nbytes + w.o.nbytes + w.gate.nbytes + w.input_norm.nbytes + w.post_attention_norm.nbytes
                for w in model.layers) + model.lm_head.nbytes + model.final_norm.nbytes
    kv = context_tokens * c.num_layers * 2 * c.num_kv_heads * c.head_dim * elem
    return dense + c.num_layers * experts_per_layer * expert + kv + batch * c.hidden_size * elem


class Timers:
    """Seconds per part, summed while `on`; `wrap` replaces a function by a timed one (undo() restores)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False
        self._undo = []

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        self._undo.append((owner, name, vars(owner).get(name, Timers)))  # Timers: none of its own
        setattr(owner, name, timed)

    def undo(self) -> None:
        for owner, name, own in reversed(self._undo):
            if own is Timers:
                delattr(owner, name)  # it was the class's method: the instance attribute goes
            else:
                setattr(owner, name, own)  # as it was (a classmethod stays one)
        self._undo.clear()


@contextmanager
def instrumented(serving: ServingEngine, distributed: bool):
    """Timers around the parts of a step (see the module's docstring). Parts nest: 'experts' holds
    'sort' and 'combine', 'wait' is the rest of 'finish'; the report subtracts."""
    t = Timers()
    engine = serving.engine
    t.wrap(attention.AttentionBatch, "build", "batch building")
    t.wrap(engine.model, "attention_block", "attention")
    t.wrap(engine.model, "moe_input", "gate and top-k")
    t.wrap(engine.model, "logits", "lm_head")
    t.wrap(engine, "step", "model step")
    t.wrap(serving.scheduler, "schedule", "scheduling")
    t.wrap(serving.scheduler, "update_from_output", "scheduling")
    t.wrap(serving, "_advance", "detokenise and stream")
    if distributed:
        t.wrap(dispatcher, "sort_by_expert", "sort")
        t.wrap(dispatcher, "combine_rows", "combine")
        t.wrap(engine.experts, "start", "dispatch")  # sort + plan + posting the messages
        t.wrap(engine.experts, "finish", "finish")  # wait + combine
    else:
        t.wrap(local_experts, "sort_by_expert", "sort")
        t.wrap(local_experts, "combine_rows", "combine")
        t.wrap(engine.experts, "start", "experts")  # sort + expert math + combine
    try:
        yield t
    finally:
        t.undo()


def workers_busy_s(cluster) -> float:
    """Seconds the expert workers have spent computing experts, all together, so far."""
    return sum(w["busy_s"] for w in cluster.placement()["workers"])


def decode_run(engine: Engine, tokenizer, batch: int, prompt_len: int, new_tokens: int,
               cluster=None, timed: bool = False):
    """One run of `batch` requests through the serving loop (of the distributed engine when cluster
    is its ExpertCluster). Returns (median decode step s,
    distinct experts per layer per step, mean context tokens per step, parts' seconds per step)."""
    engine.cache = KVCache(engine.config, engine.cache.num_blocks, engine.cache.block_size,
                           engine.cache.k.dtype, engine.cache.k.device)  # fresh: no prefix hits
    serving = ServingEngine(engine, tokenizer, ServingConfig(max_seqs=batch), own_thread=False)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    prompts = [[1] + torch.randint(3, 32000, (prompt_len - 1,), generator=g).tolist() for _ in range(batch)]
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    finished = [False] * batch
    routed: list[torch.Tensor] = []  # each decode layer's expert ids, counted after the run
    original_start = engine.experts.start

    def counting_start(layer, x, weights, ids):
        if x.shape[0] == batch:  # decode steps only (a prefill step has batch * prompt_len rows)
            routed.append(ids)
        return original_start(layer, x, weights, ids)

    engine.experts.start = counting_start
    parts, loop_s, busy = {}, 0.0, []
    try:
        with instrumented(serving, cluster is not None) if timed else _nothing() as timers:
            def sink_for(i):
                def sink(out):
                    arrivals[i].append(time.perf_counter())
                    if timers is not None and all(arrivals) and not timers.on:
                        timers.on = True  # every request has its first token: decode from here
                        if cluster is not None:
                            busy.append(workers_busy_s(cluster))
                    finished[i] = out.finish_reason is not None
                return sink

            for i, prompt in enumerate(prompts):
                serving.submit(validate_request(prompt, params, serving.limits), sink_for(i))
            serving.run(until=lambda: all(finished))
            if timers is not None:
                loop_s = max(a[-1] for a in arrivals) - max(a[0] for a in arrivals)
                parts = dict(timers.seconds)
    finally:
        del engine.experts.start
    assert all(len(a) == new_tokens for a in arrivals), [len(a) for a in arrivals]  # a chunk per token
    gaps = [b - a for times in arrivals for a, b in zip(times[:-1], times[1:])]
    steps = new_tokens - 1
    contexts = statistics.mean(prompt_len + i for i in range(1, new_tokens))  # per sequence
    per_step = {name: s / steps for name, s in parts.items()}
    if timed:
        per_step["loop"] = loop_s / steps
    if busy:  # the workers' expert math: the share of "wait" that is not messages
        per_step["experts on the workers"] = (workers_busy_s(cluster) - busy[0]) / steps
    distinct = statistics.mean(int(ids.unique().numel()) for ids in routed)
    return statistics.median(gaps), distinct, contexts * batch, per_step


@contextmanager
def _nothing():
    yield None


def breakdown(parts: dict[str, float], layers: int, distributed: bool) -> list[str]:
    """Lines of ms per step; per-layer parts also per layer."""
    p = dict(parts)
    if distributed:
        p["wait"] = p.pop("finish", 0.0) - p.get("combine", 0.0)
        p["dispatch"] = p.get("dispatch", 0.0) - p.get("sort", 0.0)
        per_layer = ("attention", "gate and top-k", "sort", "dispatch", "wait", "combine")
    else:
        p["experts"] = p.get("experts", 0.0) - p.get("sort", 0.0) - p.get("combine", 0.0)
        per_layer = ("attention", "gate and top-k", "sort", "experts", "combine")
    inside = sum(p.get(name, 0.0) for name in per_layer) + p.get("batch building", 0.0) + p.get("lm_head", 0.0)
    p["other in the step"] = p.get("model step", 0.0) - inside
    outside = p.get("scheduling", 0.0) + p.get("detokenise and stream", 0.0)
    p["sampling and the rest of the loop"] = p.get("loop", 0.0) - p.get("model step", 0.0) - outside
    lines = [f"    {name:<20} {p.get(name, 0.0) * 1e3:7.3f} ms/step  {p.get(name, 0.0) * 1e3 / layers:7.3f} ms/layer"
             for name in per_layer]
    lines += [f"    {name:<20} {p.get(name, 0.0) * 1e3:7.3f} ms/step" for name in (
        "batch building", "lm_head", "other in the step", "scheduling", "detokenise and stream",
        "sampling and the rest of the loop")]
    if distributed:
        busy = p.get("experts on the workers", 0.0)
        lines.append(f"    {'(experts on workers':<20} {busy * 1e3:7.3f} ms/step  {busy * 1e3 / layers:7.3f} ms/layer, "
                     "all workers' compute summed: the rest of 'wait' is messages and wake-ups)")
    lines.append(f"    {'whole loop':<20} {p.get('loop', 0.0) * 1e3:7.3f} ms/step (timers on)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--workers", type=int, default=2, help="expert workers of the distributed engine (0: none)")
    parser.add_argument("--replicas", default=None,
                        help="extra expert copies for the distributed engine, serve's SPEC (e.g. '*:0x2')")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixtral-layers", type=int, default=0,
                        help="the model at Mixtral 8x7B's sizes with this many layers instead of the small one "
                        "(a bf16 checkpoint of 2.8 GB a layer; the fp32 engine holds 5.6 GB a layer: 1 layer fits "
                        "24 GB beside int8, 2 do not)")
    parser.add_argument("--quantize", default="none",
                        help="int8, int4 or int8,int4: also the in-process engine with those weights")
    args = parser.parse_args()
    use_huge_pages()  # as the CLI does, before torch allocates a weight (core/heap.py)
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = Bandwidth()
    copy_bw, read_bw, kernel_bw = bandwidth.measure()
    print(f"memory bandwidth: large copy {copy_bw:.1f} GB/s (read + written), large sum {read_bw:.1f} GB/s, "
          f"linear kernel over 512 MiB at one row {kernel_bw:.1f} GB/s; each run's roofline takes the best of "
          f"the three, measured just before and after it (this machine's bandwidth drifts); torch threads "
          f"{torch.get_num_threads()}")
    ratios, speeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.mixtral_layers:
            start = time.monotonic()
            path = write_tiny_checkpoint(tmp, dtype="bfloat16", max_shard_bytes=2 << 30, num_layers=args.mixtral_layers,
                                         **MIXTRAL)
            print(f"Mixtral 8x7B sizes, {args.mixtral_layers} layer(s): checkpoint written in "
                  f"{time.monotonic() - start:.0f}s", flush=True)
        else:
            path = write_tiny_checkpoint(tmp, **MODEL)
        tokenizer = load_tokenizer(path)
        engines = [("reference", Engine.local(path, kv_blocks=1024), None)]
        quantized = [q for q in args.quantize.split(",") if q != "none"]
        for quantize in quantized:
            engines.append((f"{quantize} (in-process)", Engine.local(path, kv_blocks=1024, quantize=quantize), None))
        # one expert's bytes as each engine holds it (the workers hold the reference's: fp32)
        expert_bytes = {name: sum(layer.nbytes for layer in e.experts.weights[(0, 0)]) for name, e, _ in engines}
        if args.workers:
            from expertmesh.cluster.elastic import ExpertCluster

            cluster = ExpertCluster(path, args.workers, kv_blocks=1024, replicas=args.replicas)
            copies = f", replicas {args.replicas}" if args.replicas else ""
            engines.append((f"distributed ({args.workers} workers{copies})", cluster.engine, cluster))
            expert_bytes[engines[-1][0]] = expert_bytes["reference"]
        try:
            for name, engine, cluster in engines:
                decode_run(engine, tokenizer, 2, args.prompt_len, 4, cluster)  # warm-up
                for b in batches:
                    steps, rooflines, bandwidths = [], [], []
                    for _ in range(args.repeats):
                        before = max(bandwidth.measure(repeats=2))
                        step_s, experts, context, _ = decode_run(engine, tokenizer, b, args.prompt_len,
                                                                 args.new_tokens, cluster)
                        bw = (before + max(bandwidth.measure(repeats=2))) / 2 * 1e9
                        nbytes = step_bytes(engine, expert_bytes[name], experts, context, b)
                        steps.append(step_s)
                        rooflines.append(nbytes / bw)
                        bandwidths.append(bw / 1e9)
                    step_s = statistics.median(steps)
                    ratio = statistics.median(r / s for r, s in zip(rooflines, steps))
                    ratios[(name.split()[0], b)] = ratio
                    speeds[(name.split()[0], b)] = b / step_s
                    print(f"{name}, batch {b}: step {step_s * 1e3:.2f} ms ({b / step_s:.0f} tokens/s); "
                          f"reads {nbytes / 1e6:.1f} MB ({experts:.1f} experts/layer, {context:.0f} KV tokens); "
                          f"bandwidth {min(bandwidths):.0f}-{max(bandwidths):.0f} GB/s, roofline "
                          f"{statistics.median(rooflines) * 1e3:.2f} ms -> {ratio:.2f} of the roofline "
                          f"(median of {args.repeats} runs)")
                    parts = decode_run(engine, tokenizer, b, args.prompt_len, args.new_tokens, cluster, timed=True)[3]
                    print("\n".join(breakdown(parts, engine.config.num_layers, cluster is not None)))
        finally:
            for _, _, cluster in engines:
                if cluster is not None:
                    cluster.shutdown()
    last = (f"decode_b1_reference_over_roofline={ratios.get(('reference', 1), 0):.2f} "
            f"decode_b1_distributed_over_roofline={ratios.get(('distributed', 1), 0):.2f}")
    for quantize in quantized:
        last += (f" decode_b1_{quantize}_over_roofline={ratios.get((quantize, 1), 0):.2f} "
                 f"{quantize}_over_f32_b1={speeds.get((quantize, 1), 0) / speeds.get(('reference', 1), 1):.2f}")
    print(last)


if __name__ == "__main__":
    main()
