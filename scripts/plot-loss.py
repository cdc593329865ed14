#!/usr/bin/env python3
"""Writes a loss curve (CSV with columns step,loss) as a small self-contained SVG.

    scripts/plot-loss.py loss.csv out.svg "title"

No plotting library needed: a polyline of the running mean over 25 steps, axes and labels."""
import csv
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    with open(sys.argv[1]) as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    if not rows:
        print("no rows in", sys.argv[1])
        return 1
    window = 25
    smooth = []
    for i in range(len(rows)):
        chunk = rows[max(0, i - window + 1): i + 1]
        smooth.append((rows[i][0], sum(l for _, l in chunk) / len(chunk)))
    w, h, left, bottom, top, right = 640, 320, 60, 40, 30, 20
    max_step = rows[-1][0]
    max_loss = max(l for _, l in smooth) * 1.05
    def x(step: float) -> float:
        return left + (w - left - right) * step / max_step
    def y(loss: float) -> float:
        return h - bottom - (h - bottom - top) * loss / max_loss
    points = " ".join(f"{x(s):.1f},{y(l):.1f}" for s, l in smooth)
    ticks = []
    for k in range(5):
        v = max_loss * k / 4
        ticks.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.2f}</text>'
                     f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        s = max_step * k / 4
        ticks.append(f'<text x="{x(s):.1f}" y="{h - bottom + 16}" text-anchor="middle" font-size="11">{int(s)}</text>')
    svg = f'''<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{sys.argv[3]}</text>
{"".join(ticks)}
<line x1="{left}" x2="{left}" y1="{top}" y2="{h - bottom}" stroke="black"/>
<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" stroke="black"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>
<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">step</text>
<text x="14" y="{h / 2}" text-anchor="middle" font-size="11" transform="rotate(-90 14 {h / 2})">loss (mean of {window} steps)</text>
</svg>
'''
    with open(sys.argv[2], "w") as f:
        f.write(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
