"""The KV cache's default size: what --max-seqs sequences of the model's context need, capped by a
share of the memory free after the weights; an explicit --kv-cache-memory wins. `serve` prints the
size in bytes and tokens, and a process of the tiny model at int8 is resident at most 1.3x the
weights and the KV cache it printed, beyond what it held before the weights (the interpreter, torch,
gRPC, HTTP and the tokenizer: about 285 MiB, the same for every Mixtral)."""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest
import torch

from expertmesh.cluster.kv_size import KV_SHARE_OF_FREE, KVSizeError, kv_size, router_bytes
from expertmesh.cluster.memory_budget import expert_bytes
from expertmesh.core.config import load_config
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.kv_cache import KVCache
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess, wait_for_line
from tests.test_memory_budget import MIXTRAL_8X7B

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("kv"), seed=3)
    return path, load_config(path)


def test_default_holds_max_seqs_sequences_of_the_whole_context(tiny):
    _, config = tiny
    for max_seqs in (1, 8, 64):
        kv = kv_size(config, ServingConfig(max_seqs=max_seqs), experts_here=16, free_bytes=64 * GiB)
        assert kv.tokens == max_seqs * config.max_position_embeddings  # 4096 a sequence
        assert kv.nbytes == kv.blocks * KVCache.bytes_per_block(config, 16, torch.float32)
        assert f"--max-seqs {max_seqs}" in kv.describe() and f"{kv.tokens} tokens" in kv.describe()


def test_an_explicit_size_wins_and_one_too_small_for_a_block_is_refused(tiny):
    _, config = tiny
    kv = kv_size(config, ServingConfig(kv_cache_memory="1MiB", max_seqs=64), experts_here=16, free_bytes=1)
    assert kv.nbytes == 1 << 20 and "--kv-cache-memory 1MiB" in kv.describe()
    with pytest.raises(KVSizeError, match="holds no KV block"):
        kv_size(config, ServingConfig(kv_cache_memory="100B"), experts_here=16)


def test_mixtral_at_its_context_is_capped_by_the_memory_free_after_its_weights(tmp_path):
    """Mixtral 8x7B, 64 sequences of 32k tokens: 256 GiB of bf16 KV cache. On an 80 GiB GPU the
    router alone (experts on workers) gets half of what its weights leave; in one process with every
    expert, 93 GB of weights on 80 GiB leave nothing, and the message says what to do."""
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    config = load_config(tmp_path)
    settings = ServingConfig(dtype="bfloat16")
    kv = kv_size(config, settings, experts_here=0, device="cuda", free_bytes=80 * GiB)
    free_after = 80 * GiB - router_bytes(config, settings)
    assert kv.nbytes <= KV_SHARE_OF_FREE * free_after < kv.nbytes + kv.bytes_per_block
    assert kv.tokens < 64 * 32768 and "capped at 50%" in kv.describe() and "would take 256.0 GiB" in kv.describe()
    with pytest.raises(KVSizeError, match="--kv-cache-memory, or use --quantize or more workers"):
        kv_size(config, settings, experts_here=256, device="cuda", free_bytes=80 * GiB)
    assert 256 * expert_bytes(config, settings, True) > 80 * GiB


RUNTIME_MIB = 64  # what starting to serve adds to a process whatever the model's size


def test_serve_prints_the_kv_cache_and_stays_within_its_weights_and_cache(tiny):
    path, config = tiny
    server = ServerProcess("--model", str(path), "--workers", "0", "--quantize", "int8")
    try:
        kv_line = wait_for_line(server, "KV cache", 30)
        assert f"{64 * config.max_position_embeddings} tokens" in kv_line and "--max-seqs 64" in kv_line
        ready = wait_for_line(server, "model ready", 30)
        weights, kv, _, before = (float(x) for x in re.findall(r"([\d.]+) MiB", ready))
        assert kv == 64 * config.max_position_embeddings * KVCache.bytes_per_block(config, 1, torch.float32) / 2**20
        with grpc.insecure_channel(server.target) as channel:  # a few streams, so the process has served
            stub = pb_grpc.GenerationStub(channel)
            for i in range(4):
                sampling = pb.SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
                list(stub.Generate(pb.GenerateRequest(token_ids=[1, 30 + i] * 40, sampling=sampling), timeout=60))
        # the serving loop gives its heap's free pages back once idle (core/heap.py): wait for it.
        # Serving's own start (thread pools, the CPU kernels' library, gRPC's buffers) comes after
        # `before` and does not scale with the model: RUNTIME_MIB of it, beside 30% over the weights
        # and the cache.
        deadline = time.monotonic() + 60
        while (resident := _resident_mib(server.proc.pid)) - before > 1.3 * (weights + kv) + RUNTIME_MIB:
            assert time.monotonic() < deadline, (resident, before, weights, kv, ready)
            time.sleep(0.5)
    finally:
        assert server.stop() == 0


def _resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
