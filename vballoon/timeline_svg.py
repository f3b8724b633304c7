"""A run's timeline as an SVG picture, written directly: one lane per worker, one bar per test phase and per boot.

Each lane has two rows: the tests (collect, setup, call, teardown) above, the
machines below (a boot's outline around its stages qemu-start, kernel, init
or snapshot-load, and ssh; snapshot-save, health, restore, qemu-stop). Gaps in the test row are the worker's
idle time. Every bar has a tooltip (its name, test, variant, seconds) and
`data-kind`, `data-start` attributes. The title gives the wall time and each
worker's busy %.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from vballoon.timeline import BOOT, MACHINE_KINDS, TEST_PHASES, Event, Run, worker_load

WIDTH = 1400
LEFT = 130
"""x of the run's start; worker labels sit left of it."""
RIGHT = 30
PLOT_WIDTH = WIDTH - LEFT - RIGHT
AXIS_Y = 78
LANES_Y = 92
ROW = 16
LANE_HEIGHT = 2 * ROW + 16
TEST_KINDS = ("collect", *TEST_PHASES)
COLOURS = {
    "collect": "#bdbdbd", "setup": "#9ecae1", "call": "#2171b5", "teardown": "#6baed6",
    "qemu-start": "#fdae6b", "kernel": "#d94801", "init": "#f16913", "snapshot-load": "#fee391",
    "ssh": "#fdd0a2", "snapshot-save": "#807dba", "health": "#41ab5d", "restore": "#a1d99b", "qemu-stop": "#969696",
}
FAILED_STROKE = "#d62728"


def x_of(run: Run, moment: float) -> float:
    """The x of a wall-clock moment."""
    return LEFT + (moment - run.started) / run.wall * PLOT_WIDTH if run.wall > 0 else LEFT


def tick_step(seconds: float, ticks: int = 10) -> float:
    """A round step (1, 2 or 5 times a power of ten seconds) giving about `ticks` ticks over `seconds`."""
    raw = max(seconds / ticks, 1e-3)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _tooltip(event: Event) -> str:
    parts = [f"{event.kind} {event.name}", f"{event.seconds:.2f} s", f"worker {event.worker}"]
    parts += [f"{key} {event.attrs[key]}" for key in ("test", "variant", "outcome", "machine") if event.attrs.get(key)]
    if event.attrs.get("failed"):
        parts.append("failed")
    return "; ".join(str(part) for part in parts)


def _bar(run: Run, event: Event, y: float, height: float, outline: bool = False) -> str:
    x = x_of(run, event.start)
    width = max(x_of(run, event.end) - x, 0.5)
    failed = event.attrs.get("failed") or event.attrs.get("outcome") == "failed"
    if outline:
        paint = f'fill="none" stroke="{FAILED_STROKE if failed else "#333"}" stroke-width="1"'
    else:
        stroke = f' stroke="{FAILED_STROKE}" stroke-width="1.5"' if failed else ""
        paint = f'fill="{COLOURS.get(event.kind, "#000")}"{stroke}'
    return (f'<rect class="bar" data-kind={quoteattr(event.kind)} data-start="{event.start - run.started:.3f}" '
            f'x="{x:.2f}" y="{y:.1f}" width="{width:.2f}" height="{height:.1f}" {paint}>'
            f"<title>{escape(_tooltip(event))}</title></rect>")


def _axis(run: Run, bottom: float) -> list[str]:
    step = tick_step(run.wall)
    parts = [f'<line x1="{LEFT}" y1="{AXIS_Y}" x2="{LEFT + PLOT_WIDTH}" y2="{AXIS_Y}" stroke="#333"/>']
    for i in range(int(run.wall / step) + 1):
        x = x_of(run, run.started + i * step)
        label = f"{i * step:g} s"
        parts.append(f'<line class="tick" x1="{x:.2f}" y1="{AXIS_Y - 4}" x2="{x:.2f}" y2="{bottom}" '
                     f'stroke="#ddd"/><text x="{x:.2f}" y="{AXIS_Y - 7}" text-anchor="middle">{label}</text>')
    return parts


def _legend(y: float) -> list[str]:
    parts, x = [], LEFT
    for kind, colour in COLOURS.items():
        parts.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{x + 16}" y="{y + 10}">{kind}</text>')
        x += 24 + 7 * len(kind)
    parts.append(f'<rect x="{x}" y="{y}" width="24" height="12" fill="none" stroke="#333"/>'
                 f'<text x="{x + 28}" y="{y + 10}">boot (launch to ready)</text>')
    x += 180
    parts.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="#fff" stroke="{FAILED_STROKE}" '
                 f'stroke-width="1.5"/><text x="{x + 16}" y="{y + 10}">failed</text>')
    return parts


def render(run: Run) -> str:
    """The SVG document of `run`."""
    load = worker_load(run)
    workers = run.workers
    bottom = LANES_Y + LANE_HEIGHT * len(workers)
    height = bottom + 40
    busy = ", ".join(f"{w} busy {load[w]['busy_pct']:g}%" for w in workers)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started))
    title = f"vballoon run: {run.wall:.1f} s wall on {len(workers)} worker(s): {busy}"
    subtitle = f"{run.directory}, started {started}; upper row: tests, lower row: machines; gaps are idle time"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
        f'<text class="title" x="{LEFT}" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT}" y="40" fill="#555">{escape(subtitle)}</text>',
        *_axis(run, bottom),
    ]
    for index, worker in enumerate(workers):
        top = LANES_Y + index * LANE_HEIGHT
        parts.append(f'<g class="lane" data-worker={quoteattr(worker)}>')
        parts.append(f'<rect x="{LEFT}" y="{top + 4}" width="{PLOT_WIDTH}" height="{2 * ROW + 4}" fill="#f4f4f4"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{top + ROW + 2}" text-anchor="end" font-weight="bold">'
                     f"{escape(worker)}</text>")
        parts.append(f'<text x="{LEFT - 8}" y="{top + 2 * ROW + 2}" text-anchor="end" fill="#555">'
                     f"busy {load[worker]['busy_pct']:g}%</text>")
        for event in run.of_worker(worker):
            if event.kind in TEST_KINDS:
                parts.append(_bar(run, event, top + 6, ROW - 2))
            elif event.kind in MACHINE_KINDS:
                parts.append(_bar(run, event, top + 6 + ROW + 1, ROW - 2))
        parts += [_bar(run, event, top + 5 + ROW, ROW, outline=True)
                  for event in run.of_worker(worker) if event.kind == BOOT]
        parts.append("</g>")
    parts += _legend(bottom + 14)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_svg(run: Run, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run))
    return out
