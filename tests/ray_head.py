"""A Ray head of a test's own, started with `ray start --head` on loopback with Ray's token auth, as
a user's existing cluster is; on leaving, every process whose command line or open files name its
temp dir is ended, by PID (never `ray stop`, which ends every Ray process on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Head:
    address: str  # host:port, for --address / --cluster
    env: dict  # the environment its processes ran with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(num_cpus: int, *args: str, port: int | None = None, env: dict | None = None):
    """Yields a Head; `args` go to `ray start`, `env` into its environment. Processes the test
    starts meanwhile inherit RAY_AUTH_MODE=token (set here for the test's duration)."""
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed beside this Python")
    port = port or free_port()
    temp_dir = tempfile.mkdtemp(prefix="emray-", dir="/tmp")  # short: Ray's socket paths have a limit
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", **(env or {}))
    try:
        subprocess.run([str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus", str(num_cpus),
                        "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--include-dashboard", "false",
                        *args], check=True, capture_output=True, env=env, timeout=120)
        os.environ["RAY_AUTH_MODE"] = "token"
        yield Head(f"127.0.0.1:{port}", env)
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        end_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_naming(temp_dir)


def processes_naming(text: str) -> list[int]:
    """PIDs whose command line or open files name `text` (a test's Ray temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
                continue
            for fd in (entry / "fd").iterdir():
                if text in os.readlink(fd):
                    found.append(int(entry.name))
                    break
        except OSError:
            continue
    return found


def end_processes(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_naming(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
