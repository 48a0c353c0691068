"""A real `expertmesh serve` in a subprocess on a free loopback port, for the gRPC tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    def __init__(self, *args: str, startup_timeout: float = 180, new_session: bool = False):
        """new_session: the server leads a process group of its own (with Ray's processes), as under
        a supervisor, so a test can signal the whole group."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        self.proc = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=new_session)
        self.lines: list[str] = []
        self.target = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = re.search(r"expertmesh serving .* on (\S+) \(gRPC", line)
                if match:
                    self.target = match.group(1)
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
