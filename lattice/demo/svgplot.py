"""A hand-written SVG plot of loss against step, one line per rendezvous round, with the
demo's events marked (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .report import Row

W, H = 900, 460
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 50
COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f")


def _ticks(hi: float, n: int = 5) -> list[float]:
    return [hi * i / n for i in range(n + 1)]


def _ema(values: Sequence[float], alpha: float = 0.15) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else out[-1] + alpha * (v - out[-1]))
    return out


class _Frame:
    def __init__(self, max_step: int, max_loss: float):
        self.max_step, self.max_loss = max(max_step, 1), max_loss if max_loss > 0 else 1.0

    def x(self, step: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * step / self.max_step

    def y(self, loss: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - min(loss, self.max_loss) / self.max_loss)

    def points(self, steps: Sequence[int], losses: Sequence[float]) -> str:
        return " ".join(f"{self.x(s):.1f},{self.y(v):.1f}" for s, v in zip(steps, losses, strict=True))


def _axes(f: _Frame) -> list[str]:
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
           'fill="none" stroke="#333"/>']
    for s in _ticks(f.max_step):
        out.append(f'<line x1="{f.x(s):.1f}" y1="{H - BOTTOM}" x2="{f.x(s):.1f}" y2="{H - BOTTOM + 5}" stroke="#333"/>'
                   f'<text x="{f.x(s):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{s:.0f}</text>')
    for v in _ticks(f.max_loss):
        out.append(f'<line x1="{LEFT - 5}" y1="{f.y(v):.1f}" x2="{LEFT}" y2="{f.y(v):.1f}" stroke="#333"/>'
                   f'<text x="{LEFT - 8}" y="{f.y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    out.append(f'<text x="{(W + LEFT) / 2}" y="{H - 12}" text-anchor="middle">step</text>')
    out.append(f'<text x="16" y="{(H + TOP) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(H + TOP) / 2})">loss (rank 0 batch)</text>')
    return out


def _rounds(f: _Frame, records: Sequence[dict[str, Any]]) -> list[str]:
    out, legend = [], []
    rounds = sorted({int(r["round"]) for r in records})
    for i, rnd in enumerate(rounds):
        recs = [r for r in records if int(r["round"]) == rnd]
        steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
        color = COLORS[i % len(COLORS)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-opacity="0.3" points="{f.points(steps, losses)}"/>')
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                   f'points="{f.points(steps, _ema(losses))}"/>')
        legend.append((color, f"round {rnd}: world {recs[0]['world']}, steps {steps[0]}-{steps[-1]}"))
    for i, (color, text) in enumerate(legend):
        y = TOP + 16 + 16 * i
        out.append(f'<line x1="{W - RIGHT - 250}" y1="{y - 4}" x2="{W - RIGHT - 230}" y2="{y - 4}" '
                   f'stroke="{color}" stroke-width="2"/><text x="{W - RIGHT - 224}" y="{y}">{escape(text)}</text>')
    return out


def _events(f: _Frame, rows: Sequence[Row]) -> list[str]:
    out = []
    for i, r in enumerate(rows):
        if r.last_step is None:
            continue
        color = "#d62728" if not r.event.planned else "#ff7f0e"
        x = f.x(r.last_step)
        label = f"{r.event.label or r.event.name}: {r.lost if r.lost is not None else '?'} steps lost"
        left = x > (W + LEFT) / 2  # labels right of the middle go to the left of their line
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="{color}" '
                   f'stroke-dasharray="5,4" stroke-width="1.5"/>')
        out.append(f'<text x="{x - 4 if left else x + 4:.1f}" y="{TOP + 110 + 16 * i}" fill="{color}" '
                   f'text-anchor="{"end" if left else "start"}">{escape(label)}</text>')
    return out


def write_loss_svg(path: Path, records: Sequence[dict[str, Any]], rows: Sequence[Row], title: str) -> Path:
    """Write the plot to ``path`` and return it."""
    max_step = max((r["step"] for r in records), default=1)
    losses = sorted(r["loss"] for r in records) or [1.0]
    f = _Frame(max_step, losses[min(len(losses) - 1, int(len(losses) * 0.99))] * 1.05)
    body = [*_axes(f), *_rounds(f, records), *_events(f, rows)]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">\n'
           f'<rect width="{W}" height="{H}" fill="white"/>\n'
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>\n'
           + "\n".join(body) + "\n</svg>\n")
    path.write_text(svg)
    return path
