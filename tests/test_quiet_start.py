"""Priorities inside a worker: it imports torch at nice 19 (workers/quiet_start.py) and nothing it
serves with is left at that priority; background loads run at nice 19, a recovery's at its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from expertmesh.workers.expert_worker import ExpertWorker

PROBE = r"""
import glob, json, os, sys, threading

seen = []

class Spy:  # records the niceness of the thread that first looks for torch, then lets the import go on
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return None

sys.meta_path.insert(0, Spy())
import expertmesh.workers.expert_worker  # noqa: E402,F401

import torch  # noqa: E402

torch.set_num_threads(2)
x = torch.randn(256, 256)
(x @ x).sum()  # the compute threads exist now
threads = []
for task in glob.glob("/proc/self/task/*"):
    try:
        threads.append(int(open(task + "/stat").read().rsplit(")", 1)[1].split()[16]))
    except FileNotFoundError:
        pass
print(json.dumps({"torch_imported_at": seen[:1], "threads": threads}))
"""


def test_a_worker_process_imports_torch_at_nice_19_and_serves_at_its_own_priority():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["torch_imported_at"] == [19]
    assert report["threads"] and set(report["threads"]) == {0}, report["threads"]  # no thread left at 19


def test_a_background_load_yields_to_serving_and_a_recovery_does_not(tiny_checkpoint):
    worker = ExpertWorker(0, str(tiny_checkpoint), "float32", 1)
    seen, apply = [], worker._apply

    def spy(*args):  # the niceness of the thread a change's work runs on
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return apply(*args)

    worker._apply = spy
    worker.load([(0, 0)])  # a replica add, a restore: streams are served meanwhile
    worker.load([(0, 1)], urgent=True)  # a recovery: streams wait for it
    worker.drop([(0, 0)])
    assert seen == [19, 0, 19]
    assert worker.held() == [(0, 1)]
