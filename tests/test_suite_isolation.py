"""`make test` runs the tests in a pytest-xdist worker process: a test whose Ray dies under it (the
driver of a Ray whose GCS is SIGKILLed exits its whole process once the GCS stays away) fails
alone, and the run goes on to its summary. Run in one pytest process, such a test ended the run
with no summary at all (seen: `make: Error 1` after a failed chaos test). Shown on a small suite
of its own, run in a subprocess, so this suite stays green."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

INNER = '''
import os, signal, time
import ray

def test_a_test_whose_ray_is_killed_under_it():
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=os.environ["INNER_RAY_DIR"])
    gcs = ray._private.worker._global_node.all_processes["gcs_server"][0].process.pid
    os.kill(gcs, signal.SIGKILL)  # the driver gives the GCS 3 s to come back, then exits its process
    time.sleep(60)

def test_the_next_test_still_runs():
    assert True
'''


def test_a_test_that_takes_its_process_down_fails_alone_and_the_run_reports_it(tmp_path):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    # what the inner Ray starts, found by this folder in its command lines (short: Ray's socket paths
    # under it must fit AF_UNIX's 107 bytes)
    ray_dir = tempfile.mkdtemp(prefix="em-iso-", dir="/tmp")
    env = dict(os.environ, INNER_RAY_DIR=str(ray_dir), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_gcs_rpc_server_reconnect_timeout_s="3")
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-n", "1", "--max-worker-restart", "2",
                                 "-p", "no:cacheprovider", "-q", "--timeout", "120", str(tmp_path / "test_inner.py")],
                                capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        out = result.stdout + result.stderr
        # the process running the test died (plain pytest would end there, with no summary at all)
        assert "crashed while running 'test_inner.py::test_a_test_whose_ray_is_killed_under_it'" in out, out[-3000:]
        assert "1 failed, 1 passed" in out, out[-3000:]
    finally:
        _end_processes_naming(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _end_processes_naming(text: str) -> None:
    """SIGKILL, by PID, what still runs with `text` in its command line (the inner Ray's daemons)."""
    for _ in range(3):
        mine = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        mine.append(int(pid))
            except OSError:
                pass
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not mine:
            return
        time.sleep(0.5)
