"""Linear layers (core/linear.py) against F.linear: the GEMV kernel at 1-2 rows (core/cpu_kernels.c),
the prepacked oneDNN GEMM above, and the kernels' build from source."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.core import cpu_kernels
from expertmesh.core.linear import Linear

KERNEL = cpu_kernels.kernels()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler here: the CPU kernels are off")


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    if got.shape != expected.shape:
        return False
    if not expected.numel():
        return True
    scale = max(expected.float().abs().max().item(), 1.0)
    return (got.float() - expected.float()).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("gemv_kernel", ["default", None])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 33, 130])
def test_linear_matches_f_linear(gemv_kernel, dtype, tolerance, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(384, 96, generator=gen) / 96 ** 0.5).to(dtype)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    layer = Linear(weight) if gemv_kernel == "default" else Linear(weight, gemv_kernel=None)
    # asked of this machine, not assumed: oneDNN packs bf16 only where the CPU has AVX-512 BF16
    if layer.packed and (gemv_kernel is None or KERNEL is None):
        assert layer.weight is None, "without the kernel the packed copy replaces the weight"
    if not layer.packed:
        assert layer.weight is not None, "unpacked, the plain weight is what F.linear reads"
    got = layer(x)
    assert got.shape == (rows, 384) and got.dtype == dtype
    assert close(got, F.linear(x, weight), tolerance)
    assert layer.nbytes == weight.numel() * weight.element_size()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_cpu_where_onednn_refuses_the_weight_falls_back(monkeypatch, dtype, tolerance):
    """Forced: oneDNN refuses to pack (as on an AVX2-only CPU for bf16). The layer keeps the plain
    weight and still matches F.linear at every row count, through the kernel or torch's GEMM."""
    from expertmesh.core import linear

    monkeypatch.setattr(linear, "_prepack", lambda weight: None)
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(200, 64, generator=gen) / 8).to(dtype)
    for kernel in ("default", None):
        layer = Linear(weight) if kernel == "default" else Linear(weight, gemv_kernel=None)
        assert not layer.packed and layer.weight is not None
        for rows in (1, 2, 3, 40):
            x = torch.randn(rows, 64, generator=gen).to(dtype)
            assert close(layer(x), F.linear(x, weight), tolerance)


@needs_kernel
def test_one_and_two_rows_take_the_kernel_and_more_take_the_gemm():
    weight = torch.randn(64, 32)
    calls = []

    class Counting:
        max_rows = KERNEL.max_rows

        def supports(self, w):
            return KERNEL.supports(w)

        def gemv(self, x, w):
            calls.append(x.shape[0])
            return KERNEL.gemv(x, w)

    layer = Linear(weight, gemv_kernel=Counting())
    for rows in (1, 2, 3, 8):
        x = torch.randn(rows, 32)
        assert close(layer(x), F.linear(x, weight), 1e-5)
    assert calls == [1, 2], "1 and 2 rows through the kernel, 3 and 8 through the GEMM"


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 2), out_features=st.integers(1, 700), in_features=st.integers(1, 600),
       bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_f_linear_on_any_shape(rows, out_features, in_features, bf16, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    got = KERNEL.gemv(x, weight)
    assert got.dtype == dtype
    # fp32 accumulation of bf16 products: as exact as F.linear on the fp32 values, then rounded once
    expected = F.linear(x.float(), weight.float())
    assert close(got, expected, 1e-2 if bf16 else 1e-5)


@needs_kernel
def test_the_kernel_uses_every_thread_on_large_weights_and_one_on_small():
    big = torch.randn(4096, 256)  # 4 MiB: over PARALLEL_MIN_BYTES
    x = torch.randn(1, 256)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert close(KERNEL.gemv(x, big), F.linear(x, big), 1e-5)
    finally:
        torch.set_num_threads(before)
    assert close(KERNEL.gemv(x, big[:8].contiguous()), F.linear(x, big[:8]), 1e-5)


def test_the_kernel_builds_from_source_into_the_cache(tmp_path, monkeypatch):
    if cpu_kernels.shutil.which("cc") is None and cpu_kernels.shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    library = cpu_kernels._build()
    assert library.parent == tmp_path / "kernels" and library.exists()
    assert cpu_kernels._build() == library  # cached: the second call compiles nothing
    kernel = cpu_kernels.CpuKernels(cpu_kernels.ctypes.CDLL(str(library)))
    weight, x = torch.randn(10, 5), torch.randn(2, 5)
    assert close(kernel.gemv(x, weight), F.linear(x, weight), 1e-5)


def test_a_failed_build_leaves_the_gemm(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.raises(subprocess.CalledProcessError):
        cpu_kernels._build()
    cpu_kernels.kernels.cache_clear()
    try:
        assert cpu_kernels.kernels() is None
        assert "CPU decode kernels unavailable" in caplog.text
        weight, x = torch.randn(16, 8), torch.randn(1, 8)
        layer = Linear(weight)
        assert close(layer(x), F.linear(x, weight), 1e-5)
    finally:
        cpu_kernels.kernels.cache_clear()
    assert not list((tmp_path / "kernels").glob("*.so")), "nothing half-written is left to load"


def test_a_dtype_onednn_lacks_keeps_the_weight():
    weight = torch.randn(16, 8, dtype=torch.float16)
    layer = Linear(weight)
    assert layer.weight is weight
    x = torch.randn(3, 8, dtype=torch.float16)
    assert torch.equal(layer(x), F.linear(x, weight))
