"""The CPU's bandwidth-bound linear kernel for 1-2 rows (core/gemv.c), built on first use.

At batch 1 a decode step is a chain of matrix-vector products: its speed is how fast the weights
stream from memory. oneDNN's prepacked GEMM, the best of torch's CPU paths from 8 rows up, streams
them at 20-28 GB/s at one row on the 2-core CI machine; this kernel at 25-45 (bench/linear.py).
core/linear.py picks between the two per call, by the number of rows.

The C file is compiled once per machine (its CPU flags are in the cache key: `-march=native`) with
the system's C compiler into the expertmesh cache directory, like Triton caches its kernels. Where
no compiler works, `kernel()` is None and everything runs on the prepacked GEMM, as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from expertmesh.core.tokenizer import cache_dir

log = logging.getLogger("expertmesh.gemv")

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
PARALLEL_MIN_BYTES = 256 << 10  # below this a weight is read by one thread: waking the other costs more


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"gemv-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes starting together (expert workers)
    # never load a half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(out, target)
    return target


class Kernel:
    """The loaded library: `__call__(x, weight)` -> x @ weight.T for x with at most `max_rows` rows."""

    def __init__(self, library: ctypes.CDLL):
        self._f32, self._bf16 = library.gemv_f32, library.gemv_bf16
        for fn in (self._f32, self._bf16):
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            fn.restype = None
        self.max_rows = library.gemv_max_rows()

    def supports(self, weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (m, k) with m <= max_rows, weight (n, k) contiguous -> (m, n) in x's dtype."""
        m, k = x.shape
        n = weight.shape[0]
        assert 0 < m <= self.max_rows and weight.shape[1] == k and weight.is_contiguous(), (x.shape, weight.shape)
        x32 = x.float().contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        threads = 1 if weight.nbytes < PARALLEL_MIN_BYTES else torch.get_num_threads()
        fn = self._f32 if weight.dtype == torch.float32 else self._bf16
        fn(x32.data_ptr(), weight.data_ptr(), y.data_ptr(), m, n, k, threads)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.cache
def kernel() -> Kernel | None:
    """The compiled kernel, or None where it cannot be built here (logged once)."""
    try:
        return Kernel(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("CPU GEMV kernel unavailable, small batches use the prepacked GEMM: %s", detail)
        return None
