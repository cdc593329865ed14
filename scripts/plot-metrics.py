#!/usr/bin/env python3
"""Draws the loss and eval-loss curves of a moet::fit run as a PNG.

    scripts/plot-metrics.py RUN_DIR/metrics.csv [out.png]      (default: metrics.png beside the CSV)

Reads the CSV fit writes (step,epoch,loss,eval_loss,lr,grad_norm,tokens_per_s). With matplotlib
(Debian: python3-matplotlib) it draws a labelled figure; without it, it writes the same two curves
itself (zlib + a 3x5 pixel font for the axis numbers: no dependency at all): training loss in blue,
eval loss in orange with a dot per evaluation.
"""
from __future__ import annotations

import csv
import math
import struct
import sys
import zlib
from pathlib import Path


def read(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    loss, evals = [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            step = float(row["step"])
            if row.get("loss"):
                loss.append((step, float(row["loss"])))
            if row.get("eval_loss"):
                evals.append((step, float(row["eval_loss"])))
    return loss, evals


def with_matplotlib(loss, evals, out: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if loss:
        ax.plot(*zip(*loss), label="training loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return True


# --- the fallback: a tiny rasteriser ------------------------------------------------------------

FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": [7, 5, 5, 5, 7], "1": [2, 6, 2, 2, 7], "2": [7, 1, 7, 4, 7], "3": [7, 1, 7, 1, 7], "4": [5, 5, 7, 1, 1],
    "5": [7, 4, 7, 1, 7], "6": [7, 4, 7, 5, 7], "7": [7, 1, 1, 1, 1], "8": [7, 5, 7, 5, 7], "9": [7, 5, 7, 1, 7],
    ".": [0, 0, 0, 0, 2], "-": [0, 0, 7, 0, 0], "e": [0, 7, 7, 4, 7],
}


class Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c, width=1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            x = x0 + (x1 - x0) * k / n
            y = y0 + (y1 - y0) * k / n
            for dx in range(width):
                for dy in range(width):
                    self.dot(int(round(x)) + dx, int(round(y)) + dy, c)

    def text(self, x: int, y: int, s: str, c=(60, 60, 60), scale=2) -> None:
        for ch in s:
            for r, bits in enumerate(FONT.get(ch, [0] * 5)):
                for col in range(3):
                    if bits >> (2 - col) & 1:
                        for a in range(scale):
                            for b in range(scale):
                                self.dot(x + col * scale + a, y + r * scale + b, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def label(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def by_hand(loss, evals, out: Path) -> None:
    w, h, left, right, top, bottom = 800, 450, 70, 20, 20, 40
    c = Canvas(w, h)
    pts = loss + evals
    x_max = max(s for s, _ in pts) or 1.0
    y_lo, y_hi = min(l for _, l in pts), max(l for _, l in pts)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    x = lambda s: left + (w - left - right) * s / x_max
    y = lambda l: h - bottom - (h - bottom - top) * (l - y_lo) / (y_hi - y_lo)
    for k in range(5):  # grid and numbers
        v = y_lo + (y_hi - y_lo) * k / 4
        c.line(left, y(v), w - right, y(v), (225, 225, 225))
        c.text(4, max(2, int(y(v)) - 5), label(v))
        s = x_max * k / 4
        c.line(x(s), h - bottom, x(s), h - bottom + 5, (60, 60, 60))
        c.text(int(x(s)) - 8, h - bottom + 10, str(int(s)))
    c.line(left, top, left, h - bottom, (60, 60, 60))
    c.line(left, h - bottom, w - right, h - bottom, (60, 60, 60))
    for series, color in ((loss, (31, 119, 180)), (evals, (255, 127, 14))):
        for (s0, l0), (s1, l1) in zip(series, series[1:]):
            c.line(x(s0), y(l0), x(s1), y(l1), color, 2)
    for s, l in evals:
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                if dx * dx + dy * dy <= 9:
                    c.dot(int(x(s)) + dx, int(y(l)) + dy, (255, 127, 14))
    out.write_bytes(c.png())


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__)
        return 2
    csv_path = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else csv_path.with_name("metrics.png")
    loss, evals = read(csv_path)
    if not loss and not evals:
        print(f"plot-metrics: no loss values in {csv_path}", file=sys.stderr)
        return 1
    if with_matplotlib(loss, evals, out, str(csv_path.parent.name)):
        print(f"plot-metrics: wrote {out} (matplotlib)")
    else:
        by_hand(loss, evals, out)
        print(f"plot-metrics: wrote {out} (no matplotlib: drawn by hand; blue training loss, orange eval loss)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
