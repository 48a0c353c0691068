"""A real `expertmesh serve` in a subprocess on a free loopback port, for the gRPC tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request


class ServerProcess:
    def __init__(self, *args: str, startup_timeout: float = 180, new_session: bool = False, command: str = "serve"):
        """new_session: the server leads a process group of its own (with Ray's processes), as under
        a supervisor, so a test can signal the whole group. command: serve, or gateway (a front door
        of its own over a serve's routers)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        # the HTTP API is on by default, on a fixed port: tests take a free one unless they say otherwise
        http = [] if "--http-port" in args or "--no-http" in args else ["--http-port", "0"]
        self.proc = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", command, "--port", "0", *http, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=new_session)
        self.lines: list[str] = []
        self.target = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = re.search(r"expertmesh (serving|gateway) .* on (\S+) \(gRPC", line)
                if match:
                    self.target = match.group(2)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(startup_timeout) or self.target is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.2)
        return self.proc.returncode


def wait_for_line(server: ServerProcess, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = next((line for line in server.lines if text in line), None)
        if line is not None:
            return line
        assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(server.lines[-30:])
        time.sleep(0.1)


def scrape(url: str) -> dict[str, float]:
    """name{labels} -> value, from Prometheus' text format."""
    samples = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    out = 0.0
    for key, value in samples.items():
        match = re.fullmatch(rf"{name}(\{{(.*)\}})?", key)
        if match and all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items()):
            out += value
    return out
