"""The two run figures, drawn as plain RGB rasters and written as PNG with zlib: the accuracy-matrix
heatmap and the loss curve. No plotting library: matplotlib is not a dependency of training runs,
and these two pictures need nothing more than rectangles, lines and digits.
"""

from __future__ import annotations

import struct
import zlib

# 3x5 digit glyphs (and '.', '-', ' ') for cell labels.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000",
}


class Canvas:
    def __init__(self, w: int, h: int, bg=(255, 255, 255)):
        self.w, self.h = w, h
        self.px = [bytearray(bytes(bg) * w) for _ in range(h)]

    def set(self, x: int, y: int, c) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            self.px[y][3 * x:3 * x + 3] = bytes(c)

    def rect(self, x0, y0, x1, y1, c) -> None:
        for y in range(max(0, y0), min(self.h, y1)):
            for x in range(max(0, x0), min(self.w, x1)):
                self.px[y][3 * x:3 * x + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            self.set(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), c)

    def text(self, x, y, s: str, c=(0, 0, 0), scale: int = 2) -> None:
        for ch in s:
            g = _GLYPHS.get(ch, _GLYPHS[" "])
            for k, bit in enumerate(g):
                if bit == "1":
                    self.rect(x + (k % 3) * scale, y + (k // 3) * scale, x + (k % 3 + 1) * scale,
                              y + (k // 3 + 1) * scale, c)
            x += 4 * scale

    def save(self, path) -> None:
        raw = b"".join(b"\x00" + bytes(row) for row in self.px)

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
        with open(path, "wb") as f:
            f.write(png)


def _color(v: float):
    # white (0) to dark blue (1)
    v = min(1.0, max(0.0, v))
    return (int(255 - 225 * v), int(255 - 170 * v), int(255 - 60 * v))


def heatmap(matrix, path, cell: int = 48) -> None:
    """Rows: after training task i; columns: task j. Cells hold the score x 100; unseen cells grey."""
    t = len(matrix)
    cols = max(len(r) for r in matrix)
    c = Canvas(cols * cell + 2, t * cell + 2)
    for i, row in enumerate(matrix):
        for j in range(cols):
            v = row[j] if j < len(row) else None
            x0, y0 = 1 + j * cell, 1 + i * cell
            c.rect(x0, y0, x0 + cell - 1, y0 + cell - 1, (220, 220, 220) if v is None else _color(v))
            if v is not None:
                s = f"{100 * v:.0f}"
                c.text(x0 + (cell - len(s) * 8) // 2, y0 + cell // 2 - 5, s,
                       (255, 255, 255) if v > 0.55 else (0, 0, 0))
    c.save(path)


def loss_curve(losses: list[float], boundaries: list[int], path, w: int = 480, h: int = 240) -> None:
    """Training loss per optimizer step; grey verticals mark task boundaries."""
    c = Canvas(w, h)
    pad = 20
    c.line(pad, h - pad, w - pad, h - pad, (0, 0, 0))
    c.line(pad, pad, pad, h - pad, (0, 0, 0))
    if not losses:
        c.save(path)
        return
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1
    n = max(len(losses) - 1, 1)

    def xy(i, v):
        return pad + (w - 2 * pad) * i / n, h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

    for b in boundaries:
        x, _ = xy(b, lo)
        c.line(round(x), pad, round(x), h - pad, (180, 180, 180))
    for i in range(1, len(losses)):
        (x0, y0), (x1, y1) = xy(i - 1, losses[i - 1]), xy(i, losses[i])
        c.line(round(x0), round(y0), round(x1), round(y1), (200, 40, 40))
    c.text(pad + 4, 4, f"{hi:.2f}")
    c.text(pad + 4, h - pad + 4, f"{lo:.2f}")
    c.save(path)
