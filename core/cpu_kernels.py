"""The CPU's decode kernels (core/cpu_kernels.c), built on first use; None where they cannot be.

At batch 1 a decode step is a chain of matrix-vector products and a few hundred tiny ops. The
products' speed is how fast the weights stream from memory: oneDNN's prepacked GEMM streams them at
20-30 GB/s at one row on the 2-core CI machine, the linear kernel here at 26-50 (bench/linear.py),
about the machine's copy bandwidth, and from 32 rows up, where the FMAs decide, it is level with
oneDNN. The tiny ops (norms, rotary embedding,
the cache write, attention over a short context, gating, SwiGLU, the combine) cost 2-15 us each in torch's
dispatch against well under a microsecond of arithmetic; each kernel here replaces 4-12 of them.
Callers use the row-wise kernels only for fp32 on the CPU, for few rows, and keep their torch code for
everything else; the linear kernel takes any row count over fp32, bf16, int8 or int4 weights in their
blocked layouts (`blocked`, `blocked_int8`, `blocked_int4`), the one layout core/linear.py holds.

The C file is compiled once per machine with the system's C compiler into the expertmesh cache
directory, as Triton caches its kernels: the source, the flags (`-march=native` unless
EXPERTMESH_CPU_MARCH names another target, e.g. x86-64-v3 for AVX2 alone, which the tests use to run the
fallbacks), the CPU's flags and the compiler's identity make the key. Workers starting together build
it once: the first takes a file lock, the others wait on it and load what it built. Where no compiler
works, or the build fails or times out, `kernels()` is None (the reason logged) and everything runs on
torch.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from expertmesh.core.quantize import Q8_BLOCK, pack_int4
from expertmesh.core.tokenizer import cache_dir

log = logging.getLogger("expertmesh.cpu_kernels")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]  # and -march (EXPERTMESH_CPU_MARCH, default native)
BUILD_TIMEOUT_S = 120
# Below both, a product is one thread's: waking the other costs more than it saves. (Measured on 2
# cores: an int8 weight of 128 KiB at 8 rows, 1 Mi products, takes 0.7x the time on two threads.)
PARALLEL_MIN_BYTES = 256 << 10  # the weight's bytes (decode's few rows: the reading is the work)
PARALLEL_MIN_PRODUCTS = 1 << 17  # rows x outputs x inputs (more rows: the products are the work)
FEW_ROWS = 64  # the row-wise kernels (norm, gating, SwiGLU, combine, decode attention): up to this many rows


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    flags = [*FLAGS, f"-march={os.environ.get('EXPERTMESH_CPU_MARCH', 'native')}"]
    identity = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags, identity, _cpu_flags(),
                                                         platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build per machine: the others wait on the lock, then find the library. Built under a
    # temporary name and renamed, so nothing ever loads a half-written one.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True,
                           text=True, timeout=BUILD_TIMEOUT_S)
            os.replace(out, target)
    return target


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class CpuKernels:
    """The loaded library. Every method checks its inputs' shapes and returns new tensors, except
    rope_store, which works in place as its name says."""

    def __init__(self, library: ctypes.CDLL):
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        signatures = {
            "linear_f32": [p, p, p, p, p, i64, i64, i64, i32],
            "linear_bf16": [p, p, p, p, p, i64, i64, i64, i32],
            "linear_i8": [p, p, p, p, p, i64, i64, i64, i32],
            "linear_i4": [p, p, p, p, p, i64, i64, i64, i32],
            "linear_q8": [p, p, p, p, p, i64, i64, i64, i32],
            "linear_q4": [p, p, p, p, p, i64, i64, i64, i32],
            "rms_norm_f32": [p, p, p, i64, i64, f32],
            "rope_store_f32": [p, p, p, p, p, p, p, i64, i64, i64, i64],
            "decode_attention_f32": [p, i64, p, p, p, i64, p, p, i64, i64, i64, i64, i64, i32],
            "gate_top_k_f32": [p, p, p, i64, i64, i64],
            "silu_mul_f32": [p, p, i64, i64],
            "combine_f32": [p, p, p, p, i64, i64, i64, i64],
        }
        for name, args in signatures.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = args, None
            setattr(self, "_" + name, fn)
        for name in ("peak_fma_f32", "peak_dot_u8s8"):
            fn = getattr(library, name)
            fn.argtypes, fn.restype = [i64, i32], ctypes.c_double
            setattr(self, "_" + name, fn)
        self.panel = library.linear_panel()  # outputs per panel of the blocked layout
        self.group = library.linear_group()  # int4's columns per scale
        self._linear = {torch.float32: self._linear_f32, torch.bfloat16: self._linear_bf16,
                        torch.int8: self._linear_i8, torch.uint8: self._linear_i4}

    def peak(self, kind: str, threads: int, seconds: float = 0.5) -> float:
        """This machine's multiply-adds a second on `threads` threads from registers alone: kind
        "fma" (fp32 FMAs) or "dot" (8-bit unsigned x signed products into int32, as vpdpbusd or
        vpmaddubsw run them). The best of three timed runs of about `seconds` each."""
        fn = {"fma": self._peak_fma_f32, "dot": self._peak_dot_u8s8}[kind]
        iters = 1 << 16
        while True:  # grow until one run takes a tenth of `seconds`
            start = time.perf_counter()
            fn(iters, threads)
            took = time.perf_counter() - start
            if took > seconds / 10:
                break
            iters *= 4
        iters = max(int(iters * seconds / took), 1)
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            done = fn(iters, threads)
            best = max(best, done / (time.perf_counter() - start))
        return best

    def supports(self, weight: torch.Tensor) -> bool:
        """Whether `linear` takes this unquantized weight through `blocked` (int8 and int4 come
        through blocked_int8 and blocked_int4)."""
        return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)

    def blocked(self, *parts: torch.Tensor) -> torch.Tensor:
        """The rows of `parts` (each (n_i, k), one after the other: w1 then w3 for an expert's w13)
        -> the kernel's layout (P, k, panel), P = ceil(n / panel): panels of outputs, each k-major,
        the rows past n zero. Each part is copied once, straight into place (no joined copy first),
        so parts may be views of a checkpoint's mapping. A new tensor: the caller drops the parts."""
        n, k = sum(part.shape[0] for part in parts), parts[0].shape[1]
        out = torch.empty(-(-n // self.panel), k, self.panel, dtype=parts[0].dtype)
        rows = out.transpose(1, 2)  # (P, panel, k): rows[p, j] is output row p * panel + j
        start = 0
        for part in parts:
            end = start + part.shape[0]
            while start < end:  # a partial panel, or a run of whole ones
                p, j = divmod(start, self.panel)
                if j or end - start < self.panel:
                    take = min(self.panel - j, end - start)
                    rows[p, j:j + take] = part[part.shape[0] - (end - start):][:take]
                else:
                    take = (end - start) // self.panel * self.panel
                    rows[p:p + take // self.panel] = part[part.shape[0] - (end - start):][:take].view(-1, self.panel, k)
                start += take
        if n % self.panel:
            rows[-1, n % self.panel:] = 0
        return out

    def blocked_int8(self, q: torch.Tensor) -> torch.Tensor:
        """quantize_int8's q (n, k) -> the int8 kernel's layout (P, ceil(k / 2), 2 * panel): for each
        pair of columns, each output's two weights side by side (an odd k's last partner zero)."""
        columns = self.blocked(q)  # (P, k, panel)
        if q.shape[1] % 2:
            columns = torch.cat([columns, columns.new_zeros(columns.shape[0], 1, self.panel)], dim=1)
        pairs = columns.view(columns.shape[0], -1, 2, self.panel).transpose(2, 3)  # (P, k / 2, panel, 2)
        return pairs.reshape(columns.shape[0], -1, 2 * self.panel)

    def blocked_q8(self, q: torch.Tensor) -> torch.Tensor:
        """quantize_int8's q (n, k) -> the w8a8 kernel's layout (P, K32 / 4, 4 * panel), K32 = k rounded
        up to Q8_BLOCK: for each quad of columns, each output's four weights side by side (zeros
        past n and past k)."""
        n, k = q.shape
        panels, k32 = -(-n // self.panel), -(-k // Q8_BLOCK) * Q8_BLOCK
        full = q.new_zeros(panels * self.panel, k32)
        full[:n, :k] = q
        return full.view(panels, self.panel, k32 // 4, 4).transpose(1, 2).reshape(panels, k32 // 4, 4 * self.panel)

    def linear_q8(self, x: torch.Tensor, blocked: torch.Tensor, n: int, scale: torch.Tensor) -> torch.Tensor:
        """x (m, k) @ W.T -> (m, n) fp32 for blocked_q8's int8 weights and their per-output scale
        (P * panel,) fp32, each row of x on an int8 grid per block of Q8_BLOCK columns
        (core/cpu_kernels.c's w8a8 section). Any m, including 0."""
        m, k = x.shape
        panels = blocked.shape[0]
        assert blocked.dtype == torch.int8 and blocked.is_contiguous() and n <= panels * self.panel
        assert blocked.shape[1:] == (-(-k // Q8_BLOCK) * Q8_BLOCK // 4, 4 * self.panel), (blocked.shape, k)
        assert scale.dtype == torch.float32 and scale.shape == (panels * self.panel,)
        x32 = x.float().contiguous()
        y = torch.empty(m, panels * self.panel, dtype=torch.float32)
        if m:
            alone = blocked.nbytes < PARALLEL_MIN_BYTES and m * n * k < PARALLEL_MIN_PRODUCTS
            self._linear_q8(_ptr(x32), _ptr(blocked), _ptr(scale), None, _ptr(y), m, panels, k,
                            1 if alone else torch.get_num_threads())
        return y if n == y.shape[1] else y[:, :n].contiguous()

    def blocked_q4(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """quantize_int4's (q (n, k) int8 in [-8, 7], scale (n, groups) bf16) -> the w4a8 kernel's layout:
        (P, K32 / 8, 4 * panel) bytes, for each two quads of columns each output's four bytes, the
        first quad in the low nibbles and the second in the high ones, as q + 8; scales (P, groups,
        panel) bf16 (groups = K32 / Q8_BLOCK: int4's GROUP is the activations' block)."""
        assert Q8_BLOCK == self.group
        n, k = q.shape
        panels, k32 = -(-n // self.panel), -(-k // Q8_BLOCK) * Q8_BLOCK
        full = q.new_zeros(panels * self.panel, k32)  # past k, x is 0; past n, no output is read
        full[:n, :k] = q
        quads = full.view(panels, self.panel, k32 // 8, 2, 4).permute(0, 2, 3, 1, 4)  # (P, K32/8, 2, panel, 4)
        nibbles = (quads + 8).to(torch.uint8)
        packed = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(panels, k32 // 8, 4 * self.panel)
        scales = torch.ones(panels * self.panel, k32 // Q8_BLOCK, dtype=torch.bfloat16)
        scales[:n] = scale
        return packed.contiguous(), scales.view(panels, self.panel, -1).transpose(1, 2).contiguous()

    def linear_q4(self, x: torch.Tensor, blocked: torch.Tensor, n: int, group_scale: torch.Tensor) -> torch.Tensor:
        """x (m, k) @ W.T -> (m, n) fp32 for blocked_q4's int4 weights and group scales, each row of x on
        an int8 grid per block of Q8_BLOCK columns (core/cpu_kernels.c's w4a8 section). Any m."""
        m, k = x.shape
        panels, k32 = blocked.shape[0], -(-k // Q8_BLOCK) * Q8_BLOCK
        assert blocked.dtype == torch.uint8 and blocked.is_contiguous() and n <= panels * self.panel
        assert blocked.shape[1:] == (k32 // 8, 4 * self.panel), (blocked.shape, k)
        assert group_scale.dtype == torch.bfloat16 and group_scale.is_contiguous()
        assert group_scale.shape == (panels, k32 // Q8_BLOCK, self.panel)
        x32 = x.float().contiguous()
        y = torch.empty(m, panels * self.panel, dtype=torch.float32)
        if m:
            alone = blocked.nbytes < PARALLEL_MIN_BYTES and m * n * k < PARALLEL_MIN_PRODUCTS
            self._linear_q4(_ptr(x32), _ptr(blocked), None, _ptr(group_scale), _ptr(y), m, panels, k,
                            1 if alone else torch.get_num_threads())
        return y if n == y.shape[1] else y[:, :n].contiguous()

    def blocked_int4(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """quantize_int4's (q (n, k) int8 in [-8, 7], scale (n, groups) bf16) -> the kernel's layout:
        (P, ceil(k / 2), panel) uint8, byte j of pair c holding output j of column 2c in its low nibble
        and of column 2c + 1 in its high one, each as q + 8 (0..15: the kernel's integer products
        take them unsigned); scales (P, groups, panel) bf16."""
        columns = self.blocked(q).transpose(1, 2)  # (P, panel, k): pairs of columns along the last dim
        packed = pack_int4(columns).transpose(1, 2).contiguous() ^ 0x88  # two's complement -> q + 8
        pad = -q.shape[0] % self.panel
        if pad:
            scale = torch.cat([scale, scale.new_ones(pad, scale.shape[1])])
        return packed, scale.view(-1, self.panel, scale.shape[1]).transpose(1, 2).contiguous()

    def linear(self, x: torch.Tensor, blocked: torch.Tensor, n: int, scale: torch.Tensor | None = None,
               group_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (m, k) @ W.T -> (m, n) fp32, W's blocked layout (P, k, panel) from `blocked`; int8 weights
        (blocked_int8's, (P, ceil(k / 2), 2 * panel)) take their per-output scale (P * panel,) fp32, and
        x's rows are written as two int16 digits each (core/cpu_kernels.c); int4 ones (blocked_int4's, uint8
        (P, ceil(k / 2), panel)) their group scales (P, groups, panel) bf16. Any m, including 0."""
        m, k = x.shape
        panels = blocked.shape[0]
        shape = {torch.uint8: (-(-k // 2), self.panel), torch.int8: (-(-k // 2), 2 * self.panel)}.get(
            blocked.dtype, (k, self.panel))
        assert blocked.shape[1:] == shape and blocked.is_contiguous() and n <= panels * self.panel
        assert (scale is not None) == (blocked.dtype == torch.int8)
        assert scale is None or (scale.dtype == torch.float32 and scale.shape == (panels * self.panel,))
        assert (group_scale is not None) == (blocked.dtype == torch.uint8)
        assert group_scale is None or (group_scale.dtype == torch.bfloat16 and group_scale.is_contiguous()
                                       and group_scale.shape == (panels, -(-k // self.group), self.panel))
        x32 = x.float().contiguous()
        y = torch.empty(m, panels * self.panel, dtype=torch.float32)
        if m:
            alone = blocked.nbytes < PARALLEL_MIN_BYTES and m * n * k < PARALLEL_MIN_PRODUCTS
            threads = 1 if alone else torch.get_num_threads()
            self._linear[blocked.dtype](_ptr(x32), _ptr(blocked), _ptr(scale) if scale is not None else None,
                                        _ptr(group_scale) if group_scale is not None else None, _ptr(y), m,
                                        panels, k, threads)
        return y if n == y.shape[1] else y[:, :n].contiguous()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (m, d) fp32 contiguous, weight (d,) fp32 -> (m, d)."""
        assert x.dtype == weight.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] == weight.shape[0]
        y = torch.empty_like(x)
        self._rms_norm_f32(_ptr(x), _ptr(weight), _ptr(y), x.shape[0], x.shape[1], eps)
        return y

    def rope_store(self, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int) -> None:
        """qkv (m, (H + 2G) Dh) fp32: q and k heads rotated in place by positions (m,) int64 (tables
        cos/sin (P, Dh)); k and v written to the cache (S, G, Dh) at slots (m,) int64."""
        m = qkv.shape[0]
        _, g, dh = k_cache.shape
        assert qkv.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        assert qkv.is_contiguous() and qkv.shape[1] == (heads + 2 * g) * dh and positions.shape == slots.shape == (m,)
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and positions.dtype == slots.dtype == torch.int64
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == dh
        self._rope_store_f32(_ptr(qkv), _ptr(positions), _ptr(slots), _ptr(cos), _ptr(sin), _ptr(k_cache),
                             _ptr(v_cache), m, heads, g, dh)

    def decode_attention(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slots: torch.Tensor, lens: torch.Tensor, heads: int, window: int | None) -> torch.Tensor:
        """Row b of qkv (B, (H + 2G) Dh) is sequence b's query (its first H heads); its keys and
        values are at slots[b, :lens[b]] (B, Cmax) of the cache (S, G, Dh) -> (B, H * Dh)."""
        b = qkv.shape[0]
        _, g, dh = k_cache.shape
        assert qkv.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and qkv.is_contiguous()
        assert slots.dtype == lens.dtype == torch.int64 and slots.is_contiguous()
        assert slots.shape[0] == lens.shape[0] == b
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and heads % g == 0
        o = torch.empty(b, heads * dh, dtype=torch.float32)
        threads = torch.get_num_threads() if b * heads >= 16 else 1
        self._decode_attention_f32(_ptr(qkv), qkv.shape[1], _ptr(k_cache), _ptr(v_cache), _ptr(slots),
                                   slots.shape[1], _ptr(lens), _ptr(o), b, heads, g, dh, window or 0, threads)
        return o

    def gate_top_k(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (m, E) fp32 -> weights (m, K) fp32 summing to 1, expert ids (m, K) int64."""
        assert logits.dtype == torch.float32 and logits.is_contiguous() and 0 < k <= logits.shape[1]
        m, e = logits.shape
        weights = torch.empty(m, k, dtype=torch.float32)
        ids = torch.empty(m, k, dtype=torch.int64)
        self._gate_top_k_f32(_ptr(logits), _ptr(weights), _ptr(ids), m, e, k)
        return weights, ids

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (m, 2I) fp32, gate then up -> silu(gate) * up (m, I)."""
        assert gate_up.dtype == torch.float32 and gate_up.is_contiguous() and gate_up.shape[1] % 2 == 0
        m, width = gate_up.shape
        out = torch.empty(m, width // 2, dtype=torch.float32)
        self._silu_mul_f32(_ptr(gate_up), _ptr(out), m, width // 2)
        return out

    def combine(self, rows: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, tokens: int) -> torch.Tensor:
        """rows (N, D) fp32, the outputs for flattened (token, slot) pairs (N,) int64; weights (T, K)
        fp32 -> (T, D): each token's weighted sum of its rows."""
        assert rows.dtype == weights.dtype == torch.float32 and pairs.dtype == torch.int64
        assert rows.is_contiguous() and pairs.is_contiguous() and weights.is_contiguous()
        assert rows.shape[0] == pairs.shape[0] and weights.shape[0] == tokens
        out = torch.empty(tokens, rows.shape[1], dtype=torch.float32)
        self._combine_f32(_ptr(rows), _ptr(pairs), _ptr(weights), _ptr(out), rows.shape[0], tokens, rows.shape[1],
                          weights.shape[1])
        return out


@functools.cache
def kernels() -> CpuKernels | None:
    """The compiled kernels, or None where they cannot be built here (logged once)."""
    try:
        return CpuKernels(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("CPU decode kernels unavailable, torch ops run instead: %s", detail)
        return None


def for_rows(x: torch.Tensor) -> CpuKernels | None:
    """The kernels when a row-wise kernel should take x: fp32 on the CPU, at most FEW_ROWS rows."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[0] > FEW_ROWS:
        return None
    return kernels()
