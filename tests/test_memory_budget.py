"""--worker-memory: plans count every expert at the bytes a worker holds it in (dtype and --quantize)
and never place more on a worker than it may hold; --redundancy's copies go where there is room; a
worker lost when the survivors have no room for its experts is replaced, not squeezed in. Through
the pure plan, `expertmesh plan` on Mixtral 8x7B's own config.json, and `serve` on real Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.cluster.memory_budget import expert_bytes
from expertmesh.cluster.placement import MemoryBudget, PlacementError, PlacementPlan
from expertmesh.core import cpu_kernels
from expertmesh.core.config import load_config
from expertmesh.core.settings import ServingConfig
from expertmesh.workers.grouped_mlp import LayerExperts
from tests.gateway_server import ServerProcess
from tests.test_elastic import STREAMS, Streams, assert_idle_and_serving, checkpoint, cli, expected  # noqa: F401

# Mixtral 8x7B's config.json as the hub ships it (the fields expertmesh reads).
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "sliding_window": None, "model_type": "mixtral", "torch_dtype": "bfloat16",
                "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


@pytest.mark.parametrize("kernels", ["built", "off"])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,intermediate", [(64, 128), (40, 72), (33, 50)])
def test_bytes_per_expert_is_what_a_worker_holds(quantize, dtype, hidden, intermediate, kernels, monkeypatch):
    """Counted from the shapes alone, equal to the bytes the held layers report: the CPU's blocked
    layout (outputs padded to whole panels), the layouts of a machine without the C kernels (forced
    off: oneDNN's packed copy or the plain weight, per-call dequantization; fp8 is held plain
    everywhere), and the GPU's stacks (int8, fp8 and int4 with their scales)."""
    if kernels == "off":
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)

    def experts():
        gen = torch.Generator().manual_seed(0)
        return {e: (torch.randn(intermediate, hidden, generator=gen).to(dtype),
                    torch.randn(hidden, intermediate, generator=gen).to(dtype),
                    torch.randn(intermediate, hidden, generator=gen).to(dtype)) for e in range(3)}

    held = LayerExperts.stack(experts(), quantize=quantize).nbytes
    assert held == 3 * LayerExperts.bytes_per_expert(hidden, intermediate, dtype, quantize, "cpu")
    stacked = LayerExperts.stack(experts(), keep_stacks=True, quantize=quantize).nbytes  # the GPU's stacks
    assert stacked == 3 * LayerExperts.bytes_per_expert(hidden, intermediate, dtype, quantize, "cuda")


@pytest.mark.parametrize("quantize", ["none", "int8", "int4", "fp8"])
def test_an_expert_handed_to_a_peer_computes_the_same_and_stacks_stay_home(quantize):
    """What a worker exports of an expert (its layers as held, as raw bytes through the object store)
    becomes, in another table, an expert that computes the same bits; stacked experts (the GPU's) are
    not exported: the peer reads the checkpoint."""
    import pickle

    from expertmesh.core.linear import Linear
    from expertmesh.workers.expert_worker import _from_wire, _to_wire
    from expertmesh.workers.grouped_mlp import grouped_experts

    gen = torch.Generator().manual_seed(1)
    raw = {e: (torch.randn(96, 64, generator=gen), torch.randn(64, 96, generator=gen),
               torch.randn(96, 64, generator=gen)) for e in range(3)}
    held = LayerExperts.stack(dict(raw), quantize=quantize)
    states = _from_wire(pickle.loads(pickle.dumps(_to_wire(held.export(2)))))  # as Ray carries it
    copy = LayerExperts.empty(quantize).changed({}, set(), {2: tuple(Linear.from_state(s) for s in states)})
    rows = torch.randn(5, 64, generator=gen)
    assert torch.equal(grouped_experts(rows, copy, [2], [5]), grouped_experts(rows, held, [2], [5]))
    assert LayerExperts.stack(dict(raw), keep_stacks=True, quantize=quantize).export(2) is None


def test_plans_keep_within_the_budget():
    budget = MemoryBudget(worker_bytes=10 * 100 + 99, expert_bytes=100)  # room for 10 experts a worker
    assert budget.experts == 10 and budget.workers_for(16) == 2 and budget.workers_for(21) == 3
    plan = PlacementPlan.spread(2, 2, 8)  # 8 experts on each of 2 workers
    redundant = plan.with_min_copies(2, budget)  # 2 more copies each: the rest has no room
    assert [len(redundant.worker_pairs(w)) for w in range(2)] == [10, 10]
    assert redundant.min_copies() == 1 and not redundant.over_budget(budget)
    assert plan.with_min_copies(2).min_copies() == 2  # without a budget: every expert twice
    # one worker gone: its experts all on the survivor, whose room is 10: over it even with no extra copy
    squeezed = redundant.without_worker(1).fitted(budget)
    assert squeezed.over_budget(budget) == [0] and squeezed.min_copies() == 1
    with pytest.raises(PlacementError, match=r"worker 0 would hold 16 experts .* room for 10 .* at least 2 workers"):
        squeezed.validate(budget)
    # extra copies are what `fitted` drops first, down to the room there is
    wide = PlacementPlan.spread(3, 2, 8).with_min_copies(3)
    fitted = wide.fitted(budget)
    assert not fitted.over_budget(budget) and fitted.min_copies() >= 1
    fitted.validate(budget)


@settings(max_examples=200, deadline=None)
@given(workers=st.integers(1, 6), layers=st.integers(1, 3), experts=st.integers(1, 8),
       room=st.integers(1, 30), redundancy=st.integers(1, 4), replicas=st.integers(0, 3))
def test_redundancy_and_fitting_never_break_the_budget_or_lose_an_expert(workers, layers, experts, room,
                                                                         redundancy, replicas):
    """Any plan, any room: copies are added only where there is room, never past it; `fitted`
    drops only extra copies (every expert keeps one, no copy is added), and leaves no worker over
    the room unless its experts have no other copy."""
    budget = MemoryBudget(worker_bytes=room * 7, expert_bytes=7)
    spread = PlacementPlan.spread(workers, layers, experts)
    if spread.over_budget(budget):
        with pytest.raises(PlacementError, match="would hold"):
            spread.validate(budget)
    else:
        redundant = spread.with_min_copies(redundancy, budget)
        redundant.validate(budget)
        assert redundant.min_copies() >= 1
        for pair, ws in redundant.holders.items():  # short of copies only where every other worker is full
            if len(ws) < min(redundancy, workers):
                assert all(len(redundant.worker_pairs(w)) >= room for w in range(workers) if w not in ws)
    wide = spread.with_min_copies(min(1 + replicas, workers))  # copies regardless of room
    fitted = wide.fitted(budget)
    for pair, ws in fitted.holders.items():
        assert ws and set(ws) <= set(wide.holders[pair])
    for w in fitted.over_budget(budget):
        assert all(len(fitted.holders[p]) == 1 for p in fitted.worker_pairs(w))


def _write(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    return tmp_path


def _plan(tmp_path, *args: str) -> subprocess.CompletedProcess:
    _write(tmp_path)
    return subprocess.run([sys.executable, "-m", "expertmesh", "plan", "--model", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_plan_checks_mixtral_8x7b_against_worker_memory_from_its_config_alone(tmp_path):
    """No weights: the config.json alone. An expert is 3 x 14336 x 4096 weights (336 MiB in bf16), so
    8 workers hold 32 each (10.5 GiB): 10 GiB is too little, and the error says how many are needed."""
    config = load_config(_write(tmp_path))
    bf16 = expert_bytes(config, ServingConfig(dtype="bfloat16"), gpus=False)
    int8 = expert_bytes(config, ServingConfig(dtype="bfloat16", quantize="int8"), gpus=False)
    assert bf16 == 3 * 14336 * 4096 * 2 and int8 == 3 * 14336 * 4096 + (2 * 14336 + 4096) * 4
    refused = _plan(tmp_path, "--workers", "8", "--dtype", "bfloat16", "--worker-memory", "10GiB")
    assert refused.returncode == 2, refused.stderr
    assert f"room for {10 * 2**30 // bf16} of 336.0 MiB" in refused.stderr
    assert f"at least {-(-256 // (10 * 2**30 // bf16))} workers" in refused.stderr
    fits = _plan(tmp_path, "--workers", "8", "--dtype", "bfloat16", "--worker-memory", "12GiB")
    assert fits.returncode == 0 and fits.stdout.count("32 experts (0 replicated, 10.5 GiB)") == 8
    # redundancy 2 in bf16 does not fit 12 GiB: copies where there is room, and it says so
    partial = _plan(tmp_path, "--workers", "8", "--dtype", "bfloat16", "--worker-memory", "12GiB",
                    "--redundancy", "2", "--json")
    plan = PlacementPlan.from_json(partial.stdout)
    room = 12 * 2**30 // bf16
    assert all(len(plan.worker_pairs(w)) == room for w in range(8)) and plan.min_copies() == 1
    # in int8 every expert fits twice
    doubled = PlacementPlan.from_json(_plan(tmp_path, "--workers", "8", "--dtype", "bfloat16", "--quantize", "int8",
                                            "--worker-memory", "12GiB", "--redundancy", "2", "--json").stdout)
    assert doubled.min_copies() == 2 and max(len(doubled.worker_pairs(w)) for w in range(8)) * int8 <= 12 * 2**30
    # GPU workers in fp8 (e4m3 stacks, a fp32 scale per row): the size of int8's, counted for --device cuda
    fp8 = expert_bytes(config, ServingConfig(dtype="bfloat16", quantize="fp8", device="cuda"), gpus=True)
    assert fp8 == int8
    gpu = _plan(tmp_path, "--workers", "8", "--dtype", "bfloat16", "--quantize", "fp8", "--device", "cuda",
                "--worker-memory", "12GiB", "--redundancy", "2", "--json")
    assert gpu.returncode == 0, gpu.stderr
    assert PlacementPlan.from_json(gpu.stdout).min_copies() == 2


@pytest.mark.parametrize("size,message", [("abc", "not a size"), ("0", "worker_memory must be > 0"),
                                          ("-5GiB", "not a size"), ("300MiB", "holds no expert of this model"),
                                          ("1e400GiB", "not a size")])
def test_a_worker_memory_that_cannot_be_is_refused_by_name(tmp_path, size, message):
    result = _plan(tmp_path, "--workers", "8", "--dtype", "bfloat16", f"--worker-memory={size}")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_serve_refuses_a_plan_over_worker_memory_before_starting_anything(checkpoint):  # noqa: F811
    one = expert_bytes(load_config(checkpoint), ServingConfig(), gpus=False)
    result = subprocess.run([sys.executable, "-m", "expertmesh", "serve", "--model", str(checkpoint), "--workers", "2",
                             "--port", "0", "--worker-memory", str(7 * one)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "worker 0 would hold 8 experts" in result.stderr, result.stderr
    assert "at least 3 workers" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("standby", ["1", "0"], ids=["standby worker", "new process"])
def test_a_lost_worker_with_no_room_on_the_survivors_is_replaced(checkpoint, expected, standby):  # noqa: F811
    """2 workers with room for 12 of the 16 experts each and --redundancy 2: 8 experts get a second
    copy. Over the budget: more replicas, and fewer workers, are refused by name. Then SIGKILL a worker
    under 32 streams: the survivor has no room for the other's experts, so a new worker (the standby
    one, or a process started then) takes its place; every stream keeps its fault-free tokens and each
    worker still holds at most its budget."""
    one = expert_bytes(load_config(checkpoint), ServingConfig(), gpus=False)
    server = ServerProcess("--model", str(checkpoint), "--workers", "2", "--redundancy", "2",
                           "--worker-memory", str(12 * one), "--standby-workers", standby,
                           "--kv-cache-memory", "64MiB", "--collective-timeout", "20")
    try:
        before = cli(server, "info")
        assert before["worker_memory_bytes"] == 12 * one and before["expert_bytes"] == one
        assert [len(w["experts"]) for w in before["workers"]] == [12, 12]
        assert all(w["weight_bytes"] == 12 * one for w in before["workers"])
        for args, message in ((["--replicas", "*:0x2,*:1x2,*:2x2,*:3x2,*:4x2,*:5x2"], "would hold"),
                              (["--workers", "1"], "at least 2 workers")):
            result = subprocess.run([sys.executable, "-m", "expertmesh", "scale", *args, "--target", server.target],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 1 and "FAILED_PRECONDITION" in result.stderr, result.stderr
            assert message in result.stderr and "--worker-memory" in result.stderr, result.stderr
        assert cli(server, "info")["workers"] == before["workers"]  # nothing changed
        victim = before["workers"][1]
        streams = Streams(server.target)
        streams.wait_for(10)
        streams.mid_flight()
        os.kill(victim["pid"], signal.SIGKILL)
        assert streams.join() == expected
        after = cli(server, "info")
        assert after["epoch"] > before["epoch"] and len(after["workers"]) == 2
        assert victim["pid"] not in [w["pid"] for w in after["workers"]]
        assert all(w["weight_bytes"] <= 12 * one for w in after["workers"])
        assert any("take the lost place" in line for line in server.lines), "".join(server.lines[-20:])
        held = [name for w in after["workers"] for name in w["experts"]]
        assert {f"{l}:{e}" for l in range(2) for e in range(8)} <= set(held)  # every expert still served
        assert_idle_and_serving(server)
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])
    assert len(expected) == STREAMS
