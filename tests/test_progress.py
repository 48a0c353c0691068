"""Progress on long work, and `info` as a table. Weight loading shows per worker (bytes, rate, time
left) as bars redrawn in place on a terminal (serve through a pseudo-terminal, on a checkpoint of
1.5 GB) and as plain lines in a log (serve with its output piped); `expertmesh info` prints the
routers, the workers and which worker holds each (layer, expert) as aligned tables that say what
`info --json` says."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from expertmesh.cluster import progress as progress_module
from expertmesh.cluster.progress import Bars
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from tests.gateway_server import ServerProcess, wait_for_line
from tests.test_elastic import cli


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_redraw_in_place_on_a_terminal():
    out = Terminal()
    bars = Bars("loading", ["worker 0", "worker 1"], stream=out)
    bars.show()
    assert out.getvalue().count("starting its process") == 2
    bars.update("worker 0", 1 << 29, 2 << 30, elapsed=2.0)
    bars.update("worker 1", 2 << 30, 2 << 30, elapsed=8.0)
    bars.show()
    drawn = out.getvalue()
    assert "\x1b[2F" in drawn  # back up over the two rows drawn before
    last = drawn.rsplit("\x1b[2F", 1)[1]
    assert "worker 0 [######------------------] 512.0 MiB/2.0 GiB (25%), 256.0 MiB/s, 6s left" in last
    assert "worker 1 [########################] 2.0 GiB/2.0 GiB (100%), 256.0 MiB/s, done" in last


def test_bars_print_plain_lines_in_a_log_every_few_seconds_and_the_last(monkeypatch):
    out = io.StringIO()
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    bars = Bars("loading", ["worker 3"], stream=out)
    for step in range(20):  # a poll every half second for ten seconds
        bars.update("worker 3", step * (1 << 20), 20 << 20, elapsed=step / 2)
        bars.show()
        clock[0] += 0.5
    bars.update("worker 3", 20 << 20, 20 << 20, elapsed=10.0)
    bars.show(final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 0 s and 5 s of the polls, and the last
    assert all(line.startswith("[expertmesh] loading: worker 3 ") and "\x1b" not in line for line in lines)
    assert lines[-1].endswith("20.0 MiB/20.0 MiB (100%), 2.0 MiB/s, done")


def test_a_worker_with_nothing_to_load_says_so_at_the_end():
    """A standby worker starts with no experts: its row ends as 'nothing to load', not as starting."""
    out = io.StringIO()
    bars = Bars("loading", ["worker 6"], stream=out)
    bars.show()
    bars.show(final=True)
    assert out.getvalue().splitlines() == ["[expertmesh] loading: worker 6 starting its process",
                                           "[expertmesh] loading: worker 6 nothing to load"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("progress"), seed=4)
    server = ServerProcess("--model", str(checkpoint), "--workers", "2", "--redundancy", "2", "--max-seqs", "4")
    yield server
    assert server.stop() == 0


def test_a_piped_serve_logs_each_workers_load_as_plain_lines(server):
    line = wait_for_line(server, "[expertmesh] loading: worker 0", 10)
    assert "\x1b" not in "".join(server.lines)
    last = [line for line in server.lines if line.startswith("[expertmesh] loading:")][-1]
    for worker in (0, 1):
        assert re.search(rf"worker {worker} 1\.5 MiB/1\.5 MiB \(100%\), [\d.]+ MiB/s, done", last), last
    assert line


def test_info_prints_tables_that_say_what_its_json_says(server):
    live = cli(server, "info")
    result = subprocess.run([sys.executable, "-m", "expertmesh", "info", "--target", server.target],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"model {live['model']['model_name']}: 2 layers x 8 experts (top-2)")
    assert re.search(r"^ROUTER +PID +STATE +STREAMS +KV BLOCKS IN USE +EPOCH$", text, re.M), text
    assert re.search(rf"^0 +{live['routers'][0]['pid']} +serving +0 +0/\d+ +0$", text, re.M), text
    for w in live["workers"]:  # every worker's row, its experts counted
        assert re.search(rf"^{w['worker']} +{w['pid']} +\S+ +{len(w['experts'])} +16 +1\.5 MiB ", text, re.M), text
    grid = re.findall(r"^(\d+) +((?:\S+ +){7}\S+)$", text.split("\nLAYER ")[1], re.M)  # E0 .. E7 per layer
    assert [int(layer) for layer, _ in grid] == [0, 1]
    assert all(cell == "0,1" for _, cells in grid for cell in cells.split()), text  # --redundancy 2: both


@pytest.mark.slow
def test_a_terminal_serve_shows_each_workers_load_as_bars_that_move(tmp_path):
    """A 1.5 GB checkpoint (bf16 experts of 1024 x 3584 in 8 layers) on two workers, through a
    pseudo-terminal: each worker's bar is redrawn in place as its layers are read, from part-way to
    done."""
    checkpoint = write_tiny_checkpoint(tmp_path / "ck", seed=6, hidden_size=1024, intermediate_size=3584,
                                       num_layers=8, num_heads=8, num_kv_heads=2, head_dim=128, dtype="bfloat16",
                                       max_shard_bytes=1 << 30)
    main, child = pty.openpty()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen([sys.executable, "-m", "expertmesh", "serve", "--model", str(checkpoint), "--workers",
                             "2", "--port", "0", "--http-port", "0", "--max-seqs", "2"],
                            stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    out = b""
    try:
        deadline = time.monotonic() + 600
        while b"expertmesh serving" not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")[-3000:]
            if select.select([main], [], [], 1)[0]:
                out += os.read(main, 1 << 16)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        os.close(main)
    text = out.decode(errors="replace")
    frames = re.findall(r"loading worker (\d) \[[#-]{24}\] ([\d.]+ [MG]iB)/([\d.]+ [MG]iB) \((\d+)%\)", text)
    assert "\x1b[2F" in text and frames, text[-3000:]
    for worker in "01":
        shares = [int(share) for w, _, _, share in frames if w == worker]
        assert shares[-1] == 100 and any(0 < s < 100 for s in shares), (worker, shares)
    assert "[expertmesh] loading:" not in text  # no plain lines on a terminal
