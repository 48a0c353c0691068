"""The CPU decode kernels (core/cpu_kernels.c) against the torch code they stand in for, on any shape
hypothesis picks: norms, rotary + cache write, decode attention over paged slots (windowed or not),
gating, SwiGLU, the combine. (The linear kernel is tested with Linear, tests/test_linear.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.core import cpu_kernels
from expertmesh.router.attention import Rope

KERNELS = cpu_kernels.kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler here: the CPU kernels are off")
SETTINGS = settings(max_examples=40, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@SETTINGS
@given(rows=st.integers(1, 64), dim=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_rms_norm(rows, dim, seed):
    g = _gen(seed)
    x, weight = torch.randn(rows, dim, generator=g) * 3, torch.randn(dim, generator=g)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(KERNELS.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(rows=st.integers(1, 8), heads=st.sampled_from([(1, 1), (4, 2), (8, 2), (6, 3)]),
       half_dim=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_rope_store_rotates_q_and_k_and_writes_k_and_v(rows, heads, half_dim, seed):
    (h, g), dh = heads, 2 * half_dim
    gen = _gen(seed)
    rope = Rope(dh, 10000.0, 64)
    qkv = torch.randn(rows, (h + 2 * g) * dh, generator=gen)
    positions = torch.randint(0, 64, (rows,), generator=gen)
    slots = torch.randperm(20, generator=gen)[:rows]  # distinct slots of a 20-slot cache
    k_cache, v_cache = torch.zeros(20, g, dh), torch.zeros(20, g, dh)
    cos, sin = rope.tables(positions, torch.float32)
    expected_qk = Rope.apply(qkv[:, :(h + g) * dh].view(rows, h + g, dh), cos, sin)
    v = qkv[:, (h + g) * dh:].view(rows, g, dh).clone()
    KERNELS.rope_store(qkv, positions, slots, rope.cos, rope.sin, k_cache, v_cache, h)
    assert torch.allclose(qkv[:, :(h + g) * dh].view(rows, h + g, dh), expected_qk, atol=1e-5)
    assert torch.allclose(k_cache[slots], expected_qk[:, h:], atol=1e-5)
    assert torch.equal(v_cache[slots], v)
    others = torch.ones(20, dtype=torch.bool)
    others[slots] = False
    assert not k_cache[others].any() and not v_cache[others].any()


@SETTINGS
@given(batch=st.integers(1, 6), heads=st.sampled_from([(1, 1), (4, 2), (8, 2), (4, 1)]),
       dh=st.sampled_from([2, 8, 16, 64]), window=st.sampled_from([None, 1, 3, 50]), seed=st.integers(0, 2**31 - 1))
def test_decode_attention_over_paged_slots(batch, heads, dh, window, seed):
    (h, g) = heads
    gen = _gen(seed)
    slots_total = 64
    k_cache, v_cache = torch.randn(slots_total, g, dh, generator=gen), torch.randn(slots_total, g, dh, generator=gen)
    lens = torch.randint(1, 20, (batch,), generator=gen)
    cmax = int(lens.max())
    slots = torch.stack([torch.randperm(slots_total, generator=gen)[:cmax] for _ in range(batch)])  # (B, Cmax)
    qkv = torch.randn(batch, (h + 2 * g) * dh, generator=gen)
    got = KERNELS.decode_attention(qkv, k_cache, v_cache, slots, lens, h, window)
    for b in range(batch):  # the definition: softmax over the attended keys, one sequence at a time
        n = int(lens[b])
        first = max(0, n - window) if window else 0
        keys, values = k_cache[slots[b, first:n]], v_cache[slots[b, first:n]]  # (C, G, Dh)
        q = qkv[b, :h * dh].view(h, dh)
        kv_head = torch.arange(h) // (h // g)
        scores = torch.einsum("hd,chd->hc", q, keys[:, kv_head]) / dh ** 0.5
        expected = torch.einsum("hc,chd->hd", scores.softmax(-1), values[:, kv_head])
        assert torch.allclose(got[b].view(h, dh), expected, atol=1e-5), b


@SETTINGS
@given(rows=st.integers(1, 64), experts=st.integers(2, 16), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_gate_top_k(rows, experts, k, seed):
    k = min(k, experts)
    logits = torch.randn(rows, experts, generator=_gen(seed)) * 4
    weights, ids = KERNELS.gate_top_k(logits, k)
    probs = logits.softmax(-1)
    top_w, top_ids = probs.topk(k, -1)
    assert torch.equal(ids, top_ids)  # random logits have no ties
    assert torch.allclose(weights, top_w / top_w.sum(-1, keepdim=True), atol=1e-6)


@SETTINGS
@given(rows=st.integers(1, 64), inter=st.integers(1, 500), seed=st.integers(0, 2**31 - 1))
def test_silu_mul(rows, inter, seed):
    gate_up = torch.randn(rows, 2 * inter, generator=_gen(seed)) * 4
    gate, up = gate_up.chunk(2, -1)
    assert torch.allclose(KERNELS.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(tokens=st.integers(1, 16), k=st.integers(1, 3), dim=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_combine(tokens, k, dim, seed):
    gen = _gen(seed)
    pairs = torch.randperm(tokens * k, generator=gen)  # every (token, slot) once, in any order
    rows = torch.randn(tokens * k, dim, generator=gen)
    weights = torch.rand(tokens, k, generator=gen)
    expected = torch.zeros(tokens, dim).index_add_(0, pairs // k, rows * weights.reshape(-1)[pairs, None])
    assert torch.allclose(KERNELS.combine(rows, pairs, weights, tokens), expected, atol=1e-5)


def test_row_kernels_are_for_few_fp32_cpu_rows():
    assert cpu_kernels.for_rows(torch.zeros(cpu_kernels.FEW_ROWS, 4)) is cpu_kernels.kernels()
    assert cpu_kernels.for_rows(torch.zeros(cpu_kernels.FEW_ROWS + 1, 4)) is None  # torch's threads win there
    assert cpu_kernels.for_rows(torch.zeros(2, 4, dtype=torch.bfloat16)) is None


@SETTINGS
@given(first=st.integers(1, 70), second=st.integers(0, 70), k=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]))
def test_blocked_lays_out_parts_as_their_rows_joined(first, second, k, dtype):
    """An expert's w13 laid out from w1 and w3 in place (no joined copy first) is the layout of
    [w1; w3]: every panel boundary, partial panels and the zero padding past the last row."""
    gen = _gen(first * 1000 + second * 10 + k)
    a, b = (torch.randn(n, k, generator=gen).mul(50).to(dtype) for n in (first, second))
    joined = torch.cat([a, b])
    pad = -joined.shape[0] % KERNELS.panel
    expected = torch.cat([joined, joined.new_zeros(pad, k)]).view(-1, KERNELS.panel, k).transpose(1, 2)
    assert torch.equal(KERNELS.blocked(a, b), expected)


def test_an_expert_laid_out_from_mapped_parts_computes_as_from_a_copy(tmp_path):
    """fused_expert over views of a checkpoint's mapping (what a worker's load hands it) gives the
    same bits as over copies, and holds nothing of the mapping."""
    from expertmesh.core.checkpoint import Checkpoint
    from expertmesh.core.grouped_experts import fused_expert, swiglu_expert
    from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint

    checkpoint = Checkpoint(write_tiny_checkpoint(tmp_path, intermediate_size=40))
    mapped = checkpoint.read_experts([(0, 1)], torch.float32, mapped=True)[(0, 1)]
    copied = checkpoint.read_experts([(0, 1)], torch.float32)[(0, 1)]
    x = torch.randn(3, mapped[0].shape[1])
    a, b = fused_expert(*mapped), fused_expert(*copied)
    assert torch.equal(swiglu_expert(x, *a), swiglu_expert(x, *b))
    assert all(layer.weight.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()  # laid out anew
               for layer in a for w in mapped)
