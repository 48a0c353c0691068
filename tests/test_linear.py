"""Linear layers (core/linear.py) against F.linear: the blocked kernel of core/cpu_kernels.c at every
row count, over fp32, bf16 and int8 weights; the torch paths where the kernels are off; one copy of
each weight held; the kernels' build from source, once per machine, for this CPU and for the older
targets it falls back to (AVX2 alone, SSE2), forced here."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.core import cpu_kernels
from expertmesh.core.linear import Linear
from expertmesh.core.quantize import (
    GROUP,
    Q8_BLOCK,
    dequantize,
    dequantize_int4,
    pack_int4,
    quantize_activations_q8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

KERNELS = cpu_kernels.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler here: the CPU kernels are off")
HAS_COMPILER = cpu_kernels.shutil.which("cc") is not None or cpu_kernels.shutil.which("gcc") is not None
# targets older than this machine's that a user's CPU may be: each builds and must compute the same
OLDER_TARGETS = {"x86_64": ["x86-64-v3", "x86-64"], "aarch64": ["armv8-a"]}.get(platform.machine(), [])
# AVX-512 without VNNI or BF16 (Skylake-X's set: the integer kernels' vpmaddwd path), where this CPU runs it
if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= set(cpu_kernels._cpu_flags().split()):
    OLDER_TARGETS.insert(0, "x86-64-v4")


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    if got.shape != expected.shape:
        return False
    if not expected.numel():
        return True
    scale = max(expected.float().abs().max().item(), 1.0)
    return (got.float() - expected.float()).abs().max().item() <= tolerance * scale


def as_int16_digits(x: torch.Tensor) -> torch.Tensor:
    """What the int8 and int4 kernels multiply their weights by (core/cpu_kernels.c): each row of x
    as two int16 digits, x ~= xs * (hi + lo / 65536), xs = the row's max |x| / 32767."""
    top = x.abs().amax(dim=1, keepdim=True)
    step = top / 32767.0
    inverse = torch.where(top > 0, 32767.0 / top, 0.0)
    hi = torch.round(x * inverse)
    rest = (x.double() - hi.double() * step.double()).float()  # one rounding, as the kernel's fmaf
    lo = torch.round(rest * (inverse * 65536.0)).clamp(-32767, 32767)
    return (step.double() * (hi.double() + lo.double() / 65536)).float()


def within_the_digits(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """got is x @ weight.T computed on as_int16_digits(x): each x off by at most half a step of the
    low digit (its row's max |x| / 2^32), so each output off by at most that times the sum of its
    |weights|, plus fp32's rounding: as close as fp32 activations come."""
    expected = F.linear(x, weight)
    bound = x.abs().amax(1, keepdim=True) / 2**32 * weight.abs().sum(1) + 1e-5 * expected.abs().max().clamp(min=1)
    return bool(((got - expected).abs() <= bound).all())


def held_bytes(layer: Linear) -> int:
    """Bytes of every tensor the layer keeps."""
    return sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("kernels", ["default", None])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 33, 130])
def test_linear_matches_f_linear_holding_one_copy(kernels, dtype, tolerance, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(384, 96, generator=gen) / 96 ** 0.5).to(dtype)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    layer = Linear(weight) if kernels == "default" else Linear(weight, kernels=None)
    if kernels == "default" and KERNELS is not None:
        assert layer.layout == "blocked"
    else:  # asked of this machine, not assumed: oneDNN packs bf16 only where the CPU has AVX-512 BF16
        assert layer.layout == ("packed" if cpu_kernels_off_packs(weight) else "plain")
    got = layer(x)
    assert got.shape == (rows, 384) and got.dtype == dtype
    assert close(got, F.linear(x, weight), tolerance)
    if layer.layout != "packed":  # (oneDNN's packed tensor reports its logical size)
        assert layer.nbytes == held_bytes(layer) == weight.numel() * weight.element_size(), "one copy, counted"


def cpu_kernels_off_packs(weight: torch.Tensor) -> bool:
    from expertmesh.core.linear import _prepack

    return _prepack(weight) is not None


@pytest.mark.parametrize("kernels", ["default", None])
@pytest.mark.parametrize("rows", [1, 2, 5, 64])
@pytest.mark.parametrize("in_features", [160, 77])  # 77: a partial last group of int4
def test_quantized_layers_compute_with_the_dequantized_weight_and_hold_its_bytes(kernels, rows, in_features):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, in_features, generator=gen) / in_features ** 0.5
    x = torch.randn(rows, in_features, generator=gen)
    blocked = kernels == "default" and KERNELS is not None
    panels = KERNELS.panel if blocked else 1
    outputs = 200 + -200 % panels  # padded to whole panels in the blocked layout
    groups = -(-in_features // GROUP)
    columns = in_features + in_features % 2 if blocked else in_features  # the kernel pairs int8's columns
    for quantize, expected_bytes, reference in (
            ("int8", outputs * columns + outputs * 4, dequantize(*quantize_int8(weight))),
            ("int4", outputs * ((in_features + 1) // 2) + outputs * groups * 2,
             dequantize_int4(*quantize_int4(weight)))):
        layer = Linear(weight, quantize) if kernels == "default" else Linear(weight, quantize, kernels=None)
        assert layer.layout == ("blocked" if blocked else quantize)
        rows_as_read = as_int16_digits(x) if blocked else x
        assert close(layer(x), F.linear(rows_as_read, reference), 1e-5)
        assert not blocked or within_the_digits(layer(x), x, reference)
        assert layer.nbytes == held_bytes(layer) == expected_bytes, quantize
    assert expected_bytes < weight.numel() * 4 / 6.5  # int4 and its scales: under 5 bits a weight


@pytest.mark.parametrize("kernels", ["default", None])
@pytest.mark.parametrize("quantize", ["w8a8", "w4a8"])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 64, 300])
@pytest.mark.parametrize("in_features", [31, 160, 1000])  # a partial block of Q8_BLOCK; 5; 31 and a part
def test_w8a8_and_w4a8_multiply_the_weight_by_x_on_int8_blocks(kernels, quantize, rows, in_features):
    """--quantize w8a8 / w4a8: int8's / int4's weight; the kernel puts each row of x on an int8 grid
    per block of 32 columns and sums the byte products exactly, so its result is F.linear of those
    grids and that weight to fp32's rounding. Without the kernels they are int8 / int4 (x as given)."""
    gen = torch.Generator().manual_seed(rows + in_features)
    weight = torch.randn(70, in_features, generator=gen) / in_features ** 0.5
    x = torch.randn(rows, in_features, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    weights_only = "int8" if quantize == "w8a8" else "int4"
    reference = dequantize(*quantize_int8(weight)) if quantize == "w8a8" else dequantize_int4(*quantize_int4(weight))
    layer = Linear(weight, quantize) if kernels == "default" else Linear(weight, quantize, kernels=None)
    blocked = kernels == "default" and KERNELS is not None
    assert layer.layout == ({"w8a8": "blocked_q8", "w4a8": "blocked_q4"}[quantize] if blocked else weights_only)
    expected = F.linear(quantize_activations_q8(x) if blocked else x, reference)
    assert close(layer(x), expected, 1e-5)
    outputs = -(-70 // KERNELS.panel) * KERNELS.panel if blocked else 70
    columns = -(-in_features // Q8_BLOCK) * Q8_BLOCK if blocked else in_features
    expected_bytes = outputs * columns + outputs * 4 if quantize == "w8a8" else \
        outputs * -(-columns // 2) + outputs * -(-in_features // GROUP) * 2
    assert layer.nbytes == held_bytes(layer) == expected_bytes
    if blocked and rows:
        assert not torch.equal(layer(x), F.linear(x, reference)), "x was put on the grids"


@needs_kernels
@pytest.mark.parametrize("quantize", ["w8a8", "w4a8"])
@pytest.mark.parametrize("rows", [1, 6, 7])
def test_byte_products_at_their_extremes_sum_without_overflow(quantize, rows):
    """Every weight at its grid's end (+-7 for int4, +-127 for int8) and every x at +-127 of its grid, of one sign
    across whole blocks: the largest sums the byte kernels' 16-bit partial sums can meet (w4a8 adds a
    block's products in int16 lanes). The result is still F.linear of the grids."""
    gen = torch.Generator().manual_seed(rows)
    in_features = 4 * Q8_BLOCK
    signs = torch.where(torch.rand(48, 1, generator=gen) < 0.5, -1.0, 1.0)
    weight = signs * torch.ones(48, in_features) * torch.where(torch.arange(48) % 3 == 0, 1.0, 8 / 7)[:, None]
    x = torch.ones(rows, in_features) * torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)[:, None]
    x[:, Q8_BLOCK:2 * Q8_BLOCK] *= -1  # a block of the other sign
    reference = dequantize(*quantize_int8(weight)) if quantize == "w8a8" else dequantize_int4(*quantize_int4(weight))
    if quantize == "w4a8":
        q, _ = quantize_int4(weight)
        assert set(q.unique().tolist()) == {-7, 7}  # quantize_int4's ends (its grid is symmetric)
    layer = Linear(weight, quantize)
    assert close(layer(x), F.linear(quantize_activations_q8(x), reference), 1e-6)  # a wrapped sum: 2^16 off


@pytest.mark.parametrize("kernels", ["default", None])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4", "w8a8", "w4a8"])
def test_a_layer_handed_to_another_process_computes_the_same_bits(kernels, quantize):
    """`state()` is what a peer sends of an expert it holds (pickled through Ray's object store);
    `from_state` takes it back without reading, converting or re-laying anything. oneDNN's packed
    tensor cannot leave its process (None: the receiver reads the checkpoint); a blocked layout of
    other panels than this process's kernels lay out is refused the same way."""
    import pickle

    gen = torch.Generator().manual_seed(3)
    weight, x = torch.randn(50, 77, generator=gen), torch.randn(5, 77, generator=gen)
    layer = Linear(weight, quantize) if kernels == "default" else Linear(weight, quantize, kernels=None)
    state = layer.state()
    if layer.layout == "packed":
        assert state is None
        return
    copy = Linear.from_state(pickle.loads(pickle.dumps(state)))
    assert copy.layout == layer.layout and copy.nbytes == layer.nbytes
    assert torch.equal(copy(x), layer(x))
    if layer.layout == "blocked":
        assert Linear.from_state({**state, "panel": state["panel"] * 2}) is None


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_int8_error_is_at_most_half_a_step_per_weight(rows, k, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen) * spread
    weight[0, 0] = 0.0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (rows,)
    error = (dequantize(q, scale) - weight).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(quantize_int8(torch.zeros(2, 3))[0], torch.zeros(2, 3, dtype=torch.int8))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_int4_error_is_at_most_half_a_step_per_weight_and_packs_losslessly(rows, k, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen) * spread
    q, scale = quantize_int4(weight)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and scale.shape == (rows, -(-k // GROUP))
    step = scale.float().repeat_interleave(GROUP, dim=1)[:, :k]
    # half a step, plus what rounding the scale to bf16 moved the largest entry of the group (to 7.03 steps)
    assert ((dequantize_int4(q, scale) - weight).abs() <= step * 0.53).all()
    assert torch.equal(unpack_int4(pack_int4(q), k), q)


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 40), out_features=st.integers(1, 300), in_features=st.integers(1, 600),
       dtype=st.sampled_from(["fp32", "bf16", "int8", "int4"]), seed=st.integers(0, 2**31 - 1))
def test_the_kernel_matches_f_linear_on_any_shape(rows, out_features, in_features, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    scale = group_scale = None
    if dtype == "int8":
        q, scale = quantize_int8(weight)
        blocked, expected_weight = KERNELS.blocked_int8(q), dequantize(q, scale)
        scale = torch.cat([scale, scale.new_ones(-out_features % KERNELS.panel)])
        assert within_the_digits(KERNELS.linear(x, blocked, out_features, scale), x, expected_weight)
        x = as_int16_digits(x)  # what the kernel multiplies: its sums are exact from there
    elif dtype == "int4":
        q, group_scale = quantize_int4(weight)
        expected_weight = dequantize_int4(q, group_scale)
        blocked, group_scale = KERNELS.blocked_int4(q, group_scale)
        assert within_the_digits(KERNELS.linear(x, blocked, out_features, None, group_scale), x, expected_weight)
        x = as_int16_digits(x)
    else:
        as_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        blocked, expected_weight = KERNELS.blocked(weight.to(as_dtype)), weight.to(as_dtype).float()
    got = KERNELS.linear(x, blocked, out_features, scale, group_scale)
    # fp32 sums of exact products: as close as F.linear on the fp32 values
    assert got.dtype == torch.float32 and close(got, F.linear(x, expected_weight), 1e-5)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 50), pick=st.integers(0, 49), out_features=st.integers(1, 200),
       in_features=st.integers(1, 700), quantize=st.sampled_from(["none", "int8", "int4", "w8a8", "w4a8"]),
       seed=st.integers(0, 2**31 - 1))
def test_a_row_gets_the_same_bits_in_any_batch(rows, pick, out_features, in_features, quantize, seed):
    """Each output sums over k in one order whatever the batch or the thread count: a sequence's
    tokens do not depend on what else is in its step (or on how a replica split the rows). (int4 at
    many rows widens its weights once into fp32 first: the same products.)"""
    gen = torch.Generator().manual_seed(seed)
    layer = Linear(torch.randn(out_features, in_features, generator=gen), quantize)
    x = torch.randn(rows, in_features, generator=gen)
    pick %= rows
    alone = layer(x[pick:pick + 1])
    assert torch.equal(layer(x)[pick:pick + 1], alone)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(layer(x)[pick:pick + 1], alone)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("in_features", [255, 256, 257, 2000])  # one chunk of KC columns, and eight
def test_int8_sums_do_not_overflow_at_the_extremes(in_features):
    """Every weight at +-127 and every x at the top of its high int16 digit, with one sign: the largest sums
    there are (127 * 32767 per column). int32 would overflow past 516 columns; the kernel turns each
    chunk into fp32 before. Exact results: the products are integers times two scales."""
    signs = torch.tensor([1.0, -1.0]).repeat(8)  # 16 outputs: one panel, alternating signs
    weight = signs[:, None] * torch.full((16, in_features), 0.5)
    layer = Linear(weight, "int8")
    x = torch.full((3, in_features), 2.0)
    x[1] = -2.0
    x[2, ::2] = -2.0  # alternating signs along the row: the sums cancel column by column
    expected = F.linear(x, weight)
    assert torch.allclose(layer(x), expected, rtol=1e-6), (layer(x)[:, :2], expected[:, :2])


@needs_kernels
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_row_with_an_outlier_keeps_the_precision_of_fp32(quantize):
    """A row of x with one value 1000x the others. On one int16 digit the others would sit on a grid
    1/33 of their size, and the rounding would tip with their last bits (the same token decoded and
    prefilled came out 1e-2 apart in logprob, and then differently in different batches); on two
    digits a small change of x changes the outputs as it changes fp32's, to fp32's rounding."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(64, 512, generator=gen) / 512 ** 0.5
    reference = dequantize(*quantize_int8(weight)) if quantize == "int8" else dequantize_int4(*quantize_int4(weight))
    layer = Linear(weight, quantize)
    x = torch.randn(4, 512, generator=gen)
    x[:, 7] = 1000.0
    nudged = x * (1 + 1e-4 * torch.randn(4, 512, generator=gen))
    nudged[:, 7] = 1000.0
    change = layer(nudged) - layer(x)
    expected = F.linear(nudged, reference) - F.linear(x, reference)  # ~3e-4; one digit: off by ~6e-3
    assert (change - expected).abs().max() <= 1e-6 * layer(x).abs().max()


@needs_kernels
@pytest.mark.parametrize("quantize", ["int8", "int4", "w8a8", "w4a8"])
def test_a_row_that_is_not_finite_gives_nan_and_leaves_the_others_alone(quantize):
    """x's rows become int16 digits each on a scale of their own: an inf or NaN in one row makes that row's outputs NaN
    (as fp32's would not be finite), and the rows beside it in the batch come out as they would alone."""
    gen = torch.Generator().manual_seed(5)
    layer = Linear(torch.randn(40, 70, generator=gen), quantize)
    x = torch.randn(4, 70, generator=gen)
    alone = layer(x[[0, 3]])
    x[1, 5], x[2, 69] = float("inf"), float("nan")
    got = layer(x)
    assert got[1:3].isnan().all()
    assert torch.equal(got[[0, 3]], alone)
    zero = layer(torch.zeros(1, 70))
    assert torch.equal(zero, torch.zeros(1, 40))


@needs_kernels
def test_the_kernel_uses_every_thread_on_large_weights_and_one_on_small():
    big = Linear(torch.randn(4096, 256))  # 4 MiB: over PARALLEL_MIN_BYTES
    x = torch.randn(3, 256)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(big(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and close(results[0], x @ big_weight(big).T, 1e-5)


@needs_kernels
@pytest.mark.parametrize("quantize", ["int8", "int4", "w8a8", "w4a8"])
def test_a_small_quantized_weight_at_many_rows_gets_the_same_bits_on_any_thread_count(quantize):
    """At most 128 KiB at 32 rows: under PARALLEL_MIN_BYTES, but enough products for every thread
    (the panels split among them, and x's rows written as digits by all of them); the same bits as
    one thread, and each row as alone."""
    gen = torch.Generator().manual_seed(13)
    layer = Linear(torch.randn(256, 512, generator=gen), quantize)
    assert layer.nbytes < cpu_kernels.PARALLEL_MIN_BYTES
    x = torch.randn(32, 512, generator=gen)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(layer(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    assert all(torch.equal(results[1][r:r + 1], layer(x[r:r + 1])) for r in (0, 17, 31))


def big_weight(layer: Linear) -> torch.Tensor:
    """The (out, in) weight back from the blocked layout."""
    return layer.weight.transpose(1, 2).reshape(-1, layer.in_features)[:layer.out_features]


def test_a_cpu_where_onednn_refuses_the_weight_falls_back(monkeypatch):
    """Forced: no kernels and oneDNN refuses to pack (as for bf16 on an AVX2-only CPU). The layer
    keeps the plain weight and still matches F.linear at every row count."""
    from expertmesh.core import linear

    monkeypatch.setattr(linear, "_prepack", lambda weight: None)
    gen = torch.Generator().manual_seed(3)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        weight = (torch.randn(200, 64, generator=gen) / 8).to(dtype)
        layer = Linear(weight, kernels=None)
        assert layer.layout == "plain" and layer.weight.data_ptr() == weight.data_ptr()
        for rows in (1, 2, 3, 40):
            x = torch.randn(rows, 64, generator=gen).to(dtype)
            assert close(layer(x), F.linear(x, weight), tolerance)


def test_a_dtype_the_kernels_lack_keeps_the_weight():
    weight = torch.randn(16, 8, dtype=torch.float16)
    layer = Linear(weight)
    assert layer.layout == "plain" and layer.weight is weight
    x = torch.randn(3, 8, dtype=torch.float16)
    assert torch.equal(layer(x), F.linear(x, weight))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_the_kernels_build_from_source_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    library = cpu_kernels._build()
    assert library.parent == tmp_path / "kernels" and library.exists()
    assert cpu_kernels._build() == library  # cached: the second call compiles nothing
    monkeypatch.setenv("EXPERTMESH_CPU_MARCH", OLDER_TARGETS[0] if OLDER_TARGETS else "native")
    if OLDER_TARGETS:
        assert cpu_kernels._build() != library, "another target is another library"


@pytest.mark.skipif(not HAS_COMPILER or not OLDER_TARGETS, reason="no C compiler, or no older target known here")
@pytest.mark.parametrize("target", OLDER_TARGETS)
def test_the_kernels_built_for_an_older_cpu_compute_the_same(tmp_path, monkeypatch, target):
    """What a CPU with AVX-512 but no VNNI or BF16 (x86-64-v4, where this one can run it), without
    AVX-512 (x86-64-v3: AVX2 and FMA) or without AVX (x86-64: SSE2) runs:
    built here for that target, loaded, and checked like the native build."""
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    monkeypatch.setenv("EXPERTMESH_CPU_MARCH", target)
    older = cpu_kernels.CpuKernels(cpu_kernels.ctypes.CDLL(str(cpu_kernels._build())))
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(150, 333, generator=gen)
    for rows in (1, 2, 3, 7, 13, 40):
        x = torch.randn(rows, 333, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            layer = Linear(weight.to(dtype), kernels=older)
            assert layer.layout == "blocked" and close(layer(x.to(dtype)), F.linear(x, weight.to(dtype).float()), 2e-2)
        for quantize, reference in (("int8", dequantize(*quantize_int8(weight))),
                                    ("int4", dequantize_int4(*quantize_int4(weight)))):
            layer = Linear(weight, quantize, kernels=older)
            assert close(layer(x), F.linear(as_int16_digits(x), reference), 1e-5)
            assert torch.equal(layer(x)[:1], layer(x[:1])), "batch-invariant on every target"
        for quantize, reference in (("w8a8", dequantize(*quantize_int8(weight))),
                                    ("w4a8", dequantize_int4(*quantize_int4(weight)))):
            layer = Linear(weight, quantize, kernels=older)
            assert close(layer(x), F.linear(quantize_activations_q8(x), reference), 1e-5)
            assert torch.equal(layer(x), Linear(weight, quantize)(x)), f"{quantize}: the same bits in every build"
    norm = torch.randn(333, generator=gen)
    x = torch.randn(5, 333, generator=gen)
    assert torch.allclose(older.rms_norm(x, norm, 1e-5), norm * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5),
                          atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_workers_starting_together_build_once(tmp_path):
    """Four processes ask for the kernels at once into an empty cache: one compiles under the lock,
    the others wait and load its library; nothing half-written or temporary is left."""
    script = textwrap.dedent("""
        from expertmesh.core import cpu_kernels
        print(cpu_kernels._build(), cpu_kernels.kernels() is not None)
    """)
    env = {**os.environ, "EXPERTMESH_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({path for path, _ in outputs}) == 1 and all(ok == "True" for _, ok in outputs)
    assert [p.name for p in (tmp_path / "kernels").iterdir() if not p.name.endswith(".lock")] == \
        [os.path.basename(outputs[0][0])]


def test_a_failed_build_leaves_the_torch_paths(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.raises(subprocess.CalledProcessError):
        cpu_kernels._build()
    cpu_kernels.kernels.cache_clear()
    try:
        assert cpu_kernels.kernels() is None
        assert "CPU decode kernels unavailable" in caplog.text
        weight, x = torch.randn(16, 8), torch.randn(1, 8)
        assert close(Linear(weight)(x), F.linear(x, weight), 1e-5)
        assert Linear(weight, "int8").layout == "int8"
    finally:
        cpu_kernels.kernels.cache_clear()
    assert not [p for p in (tmp_path / "kernels").glob("*") if not p.name.endswith(".lock")], \
        "nothing half-written is left to load"
