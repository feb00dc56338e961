"""Small line plots as greyscale PNG images, with numpy and ``opentsu.png`` only.

Enough for the benchmark suite: a few series on linear or logarithmic axes, decade ticks labelled with SI
prefixes, a title, axis labels and a legend, in a built-in 5×7 pixel font (upper case, digits and a little
punctuation; other characters are drawn as blanks).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["line_plot", "write_line_plot", "text_width"]

# 5×7 glyphs: seven rows of five pixels, "#" is ink.
_GLYPHS = {
    "0": [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
    "1": ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "2": [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
    "3": ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
    "4": ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
    "5": ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
    "6": ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
    "7": ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
    "8": [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
    "9": [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
    "A": [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "B": ["#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "],
    "C": [" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "],
    "D": ["###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "],
    "E": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"],
    "F": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "],
    "G": [" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"],
    "H": ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "I": [" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "J": ["  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "],
    "K": ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"],
    "L": ["#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"],
    "M": ["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"],
    "N": ["#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"],
    "O": [" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
    "P": ["#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "],
    "Q": [" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"],
    "R": ["#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"],
    "S": [" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "],
    "T": ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "],
    "U": ["#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
    "V": ["#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "],
    "W": ["#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "],
    "X": ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"],
    "Y": ["#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "],
    "Z": ["#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"],
    ".": ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
    ",": ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "],
    ":": ["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "],
    "-": ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
    "+": ["     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "],
    "/": ["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "],
    "(": ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
    ")": [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
    "=": ["     ", "     ", "#####", "     ", "#####", "     ", "     "],
    "%": ["##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"],
    "×": ["     ", "#   #", " # # ", "  #  ", " # # ", "#   #", "     "],
    "_": ["     ", "     ", "     ", "     ", "     ", "     ", "#####"],
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _GLYPHS.items()}
_ADVANCE = 6   # pixels per character, one of them space

#: Grey levels and marker fills of successive series.
_STYLES = [(0, True), (110, False), (60, False), (150, True)]


def text_width(text: str, scale: int = 1) -> int:
    return max(0, len(text) * _ADVANCE - 1) * scale


def _text(img, x, y, text, scale=1, value=0, vertical=False):
    """Draw ``text`` with its top-left corner at (x, y); ``vertical`` runs it bottom to top."""
    for k, ch in enumerate(str(text).upper()):
        glyph = _FONT.get(ch)
        if glyph is None:
            continue
        g = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        if vertical:
            g = np.rot90(g)
            top, left = y - (k + 1) * _ADVANCE * scale + scale, x
        else:
            top, left = y, x + k * _ADVANCE * scale
        h, w = g.shape
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + h, img.shape[0]), min(left + w, img.shape[1])
        if t1 > t0 and l1 > l0:
            region = img[t0:t1, l0:l1]
            region[g[t0 - top:t1 - top, l0 - left:l1 - left]] = value


def _line(img, x0, y0, x1, y1, value, width=1, dash=0):
    """A straight segment, ``width`` pixels thick; ``dash`` > 0 draws ``dash`` on, ``dash`` off."""
    steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
    xs = np.rint(np.linspace(x0, x1, steps + 1)).astype(int)
    ys = np.rint(np.linspace(y0, y1, steps + 1)).astype(int)
    if dash:
        keep = (np.arange(steps + 1) // dash) % 2 == 0
        xs, ys = xs[keep], ys[keep]
    half = width // 2
    for dy in range(-half, width - half):
        for dx in range(-half, width - half):
            yy, xx = ys + dy, xs + dx
            ok = (yy >= 0) & (yy < img.shape[0]) & (xx >= 0) & (xx < img.shape[1])
            img[yy[ok], xx[ok]] = value


def _marker(img, x, y, value, filled, size=3):
    x, y = int(round(x)), int(round(y))
    t, b, l, r = y - size, y + size + 1, x - size, x + size + 1
    t, l = max(t, 0), max(l, 0)
    if filled:
        img[t:b, l:r] = value
    else:
        img[t:b, l:r] = 255
        img[t:b, [l, r - 1]] = value
        img[[t, b - 1], l:r] = value


def _si(value: float) -> str:
    """1, 10, 100, 1K, 10K, ... 1G: a compact label for a tick value."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1, "")):
        if abs(value) >= factor:
            scaled = value / factor
            text = f"{scaled:.0f}" if abs(scaled - round(scaled)) < 1e-6 else f"{scaled:.1f}"
            return text + suffix
    if value == 0:
        return "0"
    return f"{value:.2g}"


def _ticks(lo, hi, log):
    """Tick values covering [lo, hi] (data units), and the axis range to draw."""
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        if a == b:
            b += 1
        ticks = [10.0 ** k for k in range(a, b + 1)]
        if len(ticks) > 9:  # every other decade
            ticks = ticks[::2]
        return ticks, (10.0 ** a, 10.0 ** b)
    span = hi - lo or abs(hi) or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    start = math.floor(lo / step) * step
    stop = math.ceil(hi / step) * step
    ticks = list(np.arange(start, stop + step / 2, step))
    return ticks, (start, stop)


def line_plot(series, *, title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
              logy: bool = False, width: int = 640, height: int = 420) -> np.ndarray:
    """A (height, width) uint8 greyscale image of ``series``: a list of ``(label, xs, ys)``.

    Points with a non-finite or (on a log axis) non-positive coordinate are left out. Raises ``ValueError``
    when no series has a point to draw.
    """
    cleaned = []
    for label, xs, ys in series:
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if logx:
            ok &= xs > 0
        if logy:
            ok &= ys > 0
        cleaned.append((str(label), xs[ok], ys[ok]))
    if not any(len(xs) for _, xs, _ in cleaned):
        raise ValueError("nothing to plot: every series is empty")
    all_x = np.concatenate([xs for _, xs, _ in cleaned])
    all_y = np.concatenate([ys for _, _, ys in cleaned])
    xticks, (x_lo, x_hi) = _ticks(all_x.min(), all_x.max(), logx)
    yticks, (y_lo, y_hi) = _ticks(all_y.min(), all_y.max(), logy)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1

    img = np.full((height, width), 255, dtype=np.uint8)
    left, right, top, bottom = 70, width - 20, 40, height - 50

    def px(x):
        if logx:
            f = (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))
        else:
            f = (x - x_lo) / (x_hi - x_lo)
        return left + f * (right - left)

    def py(y):
        if logy:
            f = (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        else:
            f = (y - y_lo) / (y_hi - y_lo)
        return bottom - f * (bottom - top)

    # Grid, ticks and their labels.
    for t in xticks:
        x = px(t)
        _line(img, x, top, x, bottom, 225)
        _line(img, x, bottom, x, bottom + 4, 0)
        label = _si(t)
        _text(img, int(x - text_width(label) / 2), bottom + 8, label)
    for t in yticks:
        y = py(t)
        _line(img, left, y, right, y, 225)
        _line(img, left - 4, y, left, y, 0)
        label = _si(t)
        _text(img, left - 8 - text_width(label), int(y - 3), label)
    _line(img, left, top, left, bottom, 0)
    _line(img, left, bottom, right, bottom, 0)
    _line(img, right, top, right, bottom, 0)
    _line(img, left, top, right, top, 0)

    # Labels.
    if title:
        _text(img, int((width - text_width(title, 2)) / 2), 10, title, scale=2)
    if xlabel:
        _text(img, int((left + right - text_width(xlabel)) / 2), height - 20, xlabel)
    if ylabel:
        _text(img, 10, int((top + bottom + text_width(ylabel)) / 2), ylabel, vertical=True)

    # Series.
    for k, (label, xs, ys) in enumerate(cleaned):
        value, filled = _STYLES[k % len(_STYLES)]
        dash = 0 if k % 2 == 0 else 6
        order = np.argsort(xs)
        pts = [(px(x), py(y)) for x, y in zip(xs[order], ys[order])]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            _line(img, x0, y0, x1, y1, value, width=2, dash=dash)
        for x, y in pts:
            _marker(img, x, y, value, filled)

    # Legend, top left inside the axes.
    lx, ly = left + 12, top + 10
    for k, (label, _, _) in enumerate(cleaned):
        value, filled = _STYLES[k % len(_STYLES)]
        y = ly + 14 * k
        _line(img, lx, y + 3, lx + 24, y + 3, value, width=2, dash=0 if k % 2 == 0 else 6)
        _marker(img, lx + 12, y + 3, value, filled)
        _text(img, lx + 32, y, label)
    return img


def write_line_plot(path, series, **options) -> None:
    """``line_plot`` written as a PNG file (atomically)."""
    from .png import write_png
    write_png(path, line_plot(series, **options))
