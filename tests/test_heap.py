"""Huge pages for weights (core/heap.py): the CLI's process and every expert worker ask for them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                                reason="transparent huge pages are off on this machine")


def huge_kib(pid: int | str = "self") -> int:
    """AnonHugePages of a process, KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_the_cli_process_puts_large_tensors_in_huge_pages():
    probe = ("import expertmesh.cli, torch\n"
             "x = torch.ones(64 << 20, dtype=torch.uint8)\n"
             "print([l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 32 << 10  # KiB: most of the 64 MiB


@pytest.mark.slow
def test_an_expert_worker_holds_its_weights_in_huge_pages(tmp_path):
    # experts of 6 MB (a w13 of 4 MB, a w2 of 2 MB): blocks big enough for huge pages
    path = write_tiny_checkpoint(tmp_path, hidden_size=256, intermediate_size=2048, num_layers=1, num_experts=4,
                                 num_heads=4, num_kv_heads=2, head_dim=64)
    with ExpertCluster(path, 1, kv_blocks=16) as cluster:
        assert huge_kib(cluster.workers[0].pid) >= 2048  # KiB: huge pages, which the kernel gives only to those who ask
