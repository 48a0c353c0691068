"""Charts for docs/performance.md, drawn from the benchmarks' own JSON output (no plotting library:
plain SVG, which GitHub and any browser show).

    python bench/serve.py --json bench/results/serve.json
    python bench/elastic.py --json bench/results/elastic.json
    python bench/plots.py            # -> docs/images/serve_tokens_per_s.svg, docs/images/elastic_steps.svg

Each chart's caption names the command and the machine its JSON recorded.
"""

from __future__ import annotations

import argparse
import json
import math
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 420, 70, 200, 40, 80


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10(max(high - low, 1e-9) / n))
    step *= next(m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= n)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1) if first + i * step >= low - 1e-9]


def line_chart(title: str, caption: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               x_labels: dict[float, str] | None = None, points_only: bool = False) -> str:
    """An SVG chart: a line (or dots) per series, axes with ticks, a legend at the right."""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = 0.0, max(ys) * 1.08 if ys and max(ys) > 0 else 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    for y in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x, label in (x_labels or {x: f"{x:g}" for x in _ticks(x0, x1)}).items():
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP + ph}" y2="{TOP + ph + 4}" stroke="#333"/>'
                   f'<text x="{px(x):.1f}" y="{TOP + ph + 18}" text-anchor="middle">{escape(label)}</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{TOP + ph}" y2="{TOP + ph}" stroke="#333"/>'
               f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + ph}" stroke="#333"/>'
               f'<text x="{LEFT + pw / 2}" y="{TOP + ph + 38}" text-anchor="middle">{escape(xlabel)}</text>'
               f'<text transform="translate(16 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        if not points_only:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        radius = 2 if points_only else 3.5
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}" fill="{colour}"/>' for x, y in pts]
        ly = TOP + 10 + 20 * i
        out.append(f'<rect x="{W - RIGHT + 16}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{W - RIGHT + 34}" y="{ly + 1}">{escape(name)}</text>')
    for j, line in enumerate(_wrap(caption, 120)):
        out.append(f'<text x="{LEFT}" y="{H - 22 + 14 * j - 14 * (len(_wrap(caption, 120)) - 1)}" fill="#555" '
                   f'font-size="11">{escape(line)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def serve_chart(data: dict) -> str:
    """Tokens/s against concurrent requests, per engine (categorical x: 1, 8, 32, 64)."""
    levels = sorted({int(c) for rows in data["tokens_per_s"].values() for c in rows})
    at = {c: float(i) for i, c in enumerate(levels)}
    series = {name: [(at[int(c)], v) for c, v in sorted(rows.items(), key=lambda kv: int(kv[0]))]
              for name, rows in data["tokens_per_s"].items()}
    return line_chart("Tokens/s against concurrent requests", f"{data['command']} on {data['machine']}", series,
                      "concurrent requests", "generated tokens/s", {at[c]: str(c) for c in levels})


def elastic_chart(data: dict) -> str:
    """Each phase's steps (the gap before each token of a stream) against seconds from the phase's
    start: steady state, adds, a covered kill, a stop, an uncovered kill."""
    phases = {name: [tuple(p) for p in pts] for name, pts in data["phases"].items() if not name.endswith(", 2 s")}
    return line_chart("Gaps between a stream's tokens through changes and faults",
                      f"{data['command']} on {data['machine']}; {data['streams']} streams, experts of "
                      f"{data['expert_mb']:g} MB; x: seconds from the change or fault", phases,
                      "seconds from the event", "gap before a token (ms)", points_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the benches' JSON is")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where the SVGs go")
    args = parser.parse_args()
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for source, chart, target in (("serve.json", serve_chart, "serve_tokens_per_s.svg"),
                                  ("elastic.json", elastic_chart, "elastic_steps.svg")):
        if not (results / source).exists():
            print(f"{results / source}: missing, {target} not drawn (run the bench with --json first)")
            continue
        (out / target).write_text(chart(json.loads((results / source).read_text())))
        print(f"wrote {out / target}")


if __name__ == "__main__":
    main()
