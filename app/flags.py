"""The flags that `run` and `serve` share, and the ServingConfig they describe."""

from __future__ import annotations

import argparse

from expertmesh.core.settings import DEFAULTS, DEVICES, DTYPES, PINGPONG_MODES, QUANTIZE, ServingConfig


def add_engine_flags(parser: argparse.ArgumentParser, default_workers: int) -> None:
    """The flags `run` and `serve` share: the model, the KV cache, the scheduler, expert parallelism.
    Their defaults are ServingConfig's (core/settings.py)."""
    d = DEFAULTS
    parser.add_argument("--model", help="checkpoint folder (default: the cached tiny Mixtral)")
    parser.add_argument("--dtype", choices=DTYPES, default=d.dtype, help=f"compute dtype (default {d.dtype})")
    parser.add_argument("--quantize", choices=QUANTIZE, default=d.quantize,
                        help="int8: weight-only int8 with a scale per output channel, quantized at load from the "
                        "checkpoint (experts, attention, lm_head): a quarter of fp32's memory, and decode reads "
                        "a quarter of the bytes; int4: groups of 32 with a bf16 scale (4.5 bits a weight); fp8: "
                        "e4m3 with a scale per output channel, for GPU workers (the Triton kernel reads it; "
                        "elsewhere each call dequantizes: int8 is faster on CPUs); w8a8: int8's weights, and the CPU "
                        "kernel puts x on int8 grids per block of 32 too (llama.cpp's Q8_0 arithmetic): prompts "
                        "about twice as fast as int8, but a token decoded and the same token prefilled differ (a "
                        f"moved or preempted stream may go on differently) (default {d.quantize})")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=d.cuda_graphs,
                        help="capture decode steps of up to 32 sequences as CUDA graphs and replay them "
                        "(--workers 0 on a GPU with --dtype bfloat16; default on)")
    parser.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                        help=f"tokens computed per step (default {d.max_batch_tokens})")
    parser.add_argument("--max-seqs", type=int, default=d.max_seqs,
                        help=f"running sequences at most (default {d.max_seqs})")
    parser.add_argument("--kv-cache-memory", default=d.kv_cache_memory,
                        help="KV cache size, e.g. 512MiB (default: what --max-seqs sequences of the model's "
                        "context need, capped at half the memory free after the weights; printed at start)")
    parser.add_argument("--block-size", type=int, default=d.block_size,
                        help=f"tokens per KV cache block (default {d.block_size})")
    group = parser.add_argument_group("expert parallelism (Ray)")
    group.add_argument("--workers", type=int, default=default_workers,
                       help=f"expert workers (Ray actors); 0 runs every expert in this process "
                       f"(default {default_workers})")
    group.add_argument("--replicas", default=None,
                       help="extra expert copies: LAYER:EXPERT[xCOPIES],... with LAYER '*' for all "
                       "layers, e.g. '*:0x2' (needs --workers)")
    group.add_argument("--placement", default=None,
                       help="placement plan JSON file (which worker holds which (layer, expert))")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join (default: start an embedded local Ray)")
    group.add_argument("--pingpong", choices=PINGPONG_MODES, default=d.pingpong,
                       help="overlap two micro-batches at the experts: auto (default) splits steps of "
                       "--pingpong-min-tokens+ new tokens, where expert GEMMs are compute-bound; "
                       "on/off to measure")
    group.add_argument("--pingpong-min-tokens", type=int, default=d.pingpong_min_tokens,
                       help=f"with --pingpong auto, the new tokens a step needs to be split (default "
                       f"{d.pingpong_min_tokens}, measured on a 2-core CPU by bench/dispatch.py; measure yours)")
    group.add_argument("--collective-timeout", type=float, default=d.collective_timeout_s,
                       help=f"seconds before a step stuck on a worker fails, the backstop behind heartbeats: "
                       f"longer than the longest prefill step (default {d.collective_timeout_s:g})")
    group.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout_s,
                       help="seconds without a heartbeat before a worker counts as stalled and is replaced "
                       f"(default {d.heartbeat_timeout_s:g})")
    group.add_argument("--redundancy", type=int, default=d.redundancy,
                       help="copies of every expert to keep, where there are workers for them: 2 means one "
                       f"worker's death pauses no stream (default {d.redundancy})")
    group.add_argument("--standby-workers", type=int, default=d.standby_workers,
                       help="worker processes started ahead with no weights, so that adding or replacing a "
                       f"worker starts no process while streams run (default {d.standby_workers})")
    group.add_argument("--worker-memory", default=d.worker_memory, metavar="SIZE",
                       help="expert weights one worker may hold, e.g. 20GiB (counted at --dtype and --quantize): "
                       "plans never place more, --redundancy's copies go only where it leaves room, and a "
                       "lost worker whose experts the others have no room for is replaced (default: no limit)")
    group.add_argument("--device", choices=DEVICES, default=d.device,
                       help="run on GPUs (router, and expert workers one GPU each with NCCL) or CPUs "
                       "(gloo); auto (default): GPUs when this process sees one")
    group.add_argument("--placement-timeout", type=float, default=d.placement_timeout_s,
                       help=f"seconds to wait for Ray (and its autoscaler) to provide the workers' "
                       f"resources (default {d.placement_timeout_s:g})")
    group.add_argument("--worker-threads", type=int, default=d.worker_threads,
                       help=f"torch threads per CPU expert worker (default {d.worker_threads})")


def serving_config(args) -> ServingConfig:
    """The ServingConfig the flags describe (checked by ServingConfig itself)."""
    return ServingConfig(
        dtype=args.dtype, quantize=args.quantize, device=args.device, max_batch_tokens=args.max_batch_tokens,
        max_seqs=args.max_seqs,
        max_queue=getattr(args, "max_queue", DEFAULTS.max_queue), kv_cache_memory=args.kv_cache_memory,
        stall_timeout_s=getattr(args, "stall_timeout", DEFAULTS.stall_timeout_s),
        block_size=args.block_size, pingpong=args.pingpong, pingpong_min_tokens=args.pingpong_min_tokens,
        collective_timeout_s=args.collective_timeout, placement_timeout_s=args.placement_timeout,
        worker_threads=args.worker_threads, cuda_graphs=args.cuda_graphs,
        heartbeat_timeout_s=args.heartbeat_timeout, redundancy=args.redundancy, standby_workers=args.standby_workers,
        worker_memory=args.worker_memory)
