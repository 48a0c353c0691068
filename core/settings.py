"""The serving configuration: every tunable of the engine, the scheduler, bring-up and the workers,
with its default, in one place. The CLI's flags, the cluster bring-up, the engine, the scheduler and
the expert workers all read it; nothing else writes a default of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}

DTYPES = ("float32", "bfloat16")
PINGPONG_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZE = ("none", "int8", "int4", "fp8", "w8a8", "w4a8")  # core/quantize.py


class SettingsError(ValueError):
    """A serving setting out of range; the message names it."""


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise SettingsError(f"not a size: {text!r} (use e.g. 512MiB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class ServingConfig:
    # --- the model -------------------------------------------------------------------------------
    dtype: str = "float32"  # compute dtype; bf16 halves memory but on the CPU gained little (bench/)
    # int8: weight-only, a scale per output channel, quantized at load (experts, attention, lm_head;
    # the gate stays in dtype): a quarter of fp32's bytes, which is what decode reads; int4: groups of
    # 32; fp8: e4m3 per output channel, for GPU workers (core/quantize.py)
    quantize: str = "none"
    device: str = "auto"  # auto: GPUs (router and one per worker, NCCL) when this process sees one
    # decode steps of up to 32 sequences as captured CUDA graphs (in-process engine on a GPU, bf16)
    cuda_graphs: bool = True
    # --- the scheduler ---------------------------------------------------------------------------
    max_batch_tokens: int = 2048  # tokens computed per step: bounds a step's time and memory
    max_seqs: int = 64  # running sequences at most: the decode batch
    max_queue: int = 1024  # waiting requests at most; past it a request is refused, never dropped
    # KV cache size; None: what max_seqs sequences of the model's context need, capped by a share of
    # the memory free after the weights (cluster/kv_size.py)
    kv_cache_memory: str | None = None
    block_size: int = 16  # tokens per KV block: vLLM's default, small enough for prefix sharing
    # --- expert parallelism ----------------------------------------------------------------------
    pingpong: str = "auto"  # two micro-batches overlapping at the experts: auto splits big steps
    # With pingpong auto, the new tokens a step needs to be split: below it decode expert GEMMs are
    # memory-bound and a split reads every expert's weights twice (bench/dispatch.py, 2-core CPU).
    pingpong_min_tokens: int = 256
    # the backstop for a step stuck on a worker: long enough for the longest prefill step of a real
    # model; stalls are found far sooner by heartbeats (heartbeat_timeout_s)
    collective_timeout_s: float = 30.0
    # a worker that has not answered a heartbeat for this long is stalled: it is fenced (killed) and
    # its epoch ends. Heartbeats are control calls answered beside the data path, so a long step
    # does not delay them (2 s: well above a busy machine's scheduling hiccups, within a 3 s target)
    heartbeat_timeout_s: float = 2.0
    # copies of every (layer, expert) the planner keeps (where workers allow): with 2, one worker's
    # death pauses no stream, its copies are restored in the background
    redundancy: int = 1
    # worker processes started ahead with no weights: an add or a replacement starts no process
    standby_workers: int = 0
    # expert weight bytes one worker may hold (e.g. "20GiB": a GPU's memory less activations and
    # buffers); plans never exceed it, redundancy's copies go only where it leaves room. None: no limit
    worker_memory: str | None = None
    placement_timeout_s: float = 600.0  # wait for Ray (and its autoscaler) to provide workers' resources
    # health says NOT_SERVING while a step runs longer than this (a stalled worker, before the
    # collective timeout fails the step); a step of the tiny model takes milliseconds, a GPU's too
    stall_timeout_s: float = 10.0
    # torch threads per CPU expert worker: its cores are shared with the router; 2 was 2x slower here
    worker_threads: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise SettingsError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.device not in DEVICES:
            raise SettingsError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.pingpong not in PINGPONG_MODES:
            raise SettingsError(f"pingpong must be one of {', '.join(PINGPONG_MODES)}, got {self.pingpong!r}")
        for name in ("max_batch_tokens", "max_seqs", "block_size", "pingpong_min_tokens", "worker_threads",
                     "redundancy"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "standby_workers"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("collective_timeout_s", "placement_timeout_s", "stall_timeout_s", "heartbeat_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        if self.worker_memory is not None and parse_bytes(self.worker_memory) < 1:
            raise SettingsError(f"worker_memory must be > 0, got {self.worker_memory!r}")

    @property
    def worker_bytes(self) -> int | None:
        return None if self.worker_memory is None else parse_bytes(self.worker_memory)

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory)


DEFAULTS = ServingConfig()
