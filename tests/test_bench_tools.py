"""The bench tools that are not benchmarks: bench/plots.py draws the docs' charts from the benches'
JSON (every series and point of the input is in the SVG, which parses as XML, and the caption names
the command and machine); bench/gpu_check.sh, on a machine without a GPU, says so and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
SVG = "{http://www.w3.org/2000/svg}"


def test_plots_draw_every_series_of_the_benches_json(tmp_path):
    results, out = tmp_path / "results", tmp_path / "images"
    results.mkdir()
    serve = {"command": "python bench/serve.py --json x", "machine": "a test machine",
             "tokens_per_s": {"in process": {"1": 50.0, "8": 300.0, "32": 700.0, "64": 800.0},
                              "2 workers": {"1": 30.0, "8": 200.0, "32": 600.0, "64": 750.0}}}
    elastic = {"command": "python bench/elastic.py --json y", "machine": "a test machine", "streams": 16,
               "expert_mb": 64, "events_s": {"kill, covered": 0.1},
               "phases": {"steady": [[0.1, 180.0], [0.3, 200.0]], "kill, covered": [[0.2, 190.0], [0.5, 400.0]],
                          "kill, covered, 2 s": [[0.2, 190.0]]}}
    (results / "serve.json").write_text(json.dumps(serve))
    (results / "elastic.json").write_text(json.dumps(elastic))
    run = subprocess.run([sys.executable, str(BENCH / "plots.py"), "--results", str(results), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    chart = ET.parse(out / "serve_tokens_per_s.svg").getroot()
    texts = [t.text for t in chart.iter(SVG + "text")]
    assert "in process" in texts and "2 workers" in texts and ["1", "8", "32", "64"] == [t for t in texts if t in
                                                                                       ("1", "8", "32", "64")]
    assert len(list(chart.iter(SVG + "polyline"))) == 2 and len(list(chart.iter(SVG + "circle"))) == 8
    assert any("a test machine" in (t or "") for t in texts)
    steps = ET.parse(out / "elastic_steps.svg").getroot()
    names = [t.text for t in steps.iter(SVG + "text")]
    assert "steady" in names and "kill, covered" in names and "kill, covered, 2 s" not in names
    assert len(list(steps.iter(SVG + "circle"))) == 4


def test_the_gpu_check_says_there_is_no_gpu_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # none, even on a GPU machine
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "gpu_check: no CUDA GPU here (torch sees none): nothing run", run.stdout
