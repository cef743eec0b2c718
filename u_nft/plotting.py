"""A small PNG line plot (mean curve with a shaded spread) drawn with PIL, so experiments need no matplotlib."""
from __future__ import annotations

import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _font(size: int):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low or 1.0
    return [low + span * i / (count - 1) for i in range(count)]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
              path: str | os.PathLike, title: str = "", xlabel: str = "", ylabel: str = "",
              size: tuple[int, int] = (720, 440)) -> str:
    """Draw each series ``label -> (x, mean, low, high)`` as a line with a shaded [low, high] band.

    Returns the path written (parent folders are created).
    """
    width, height = size
    left, right, top, bottom = 70, 190, 36, 50
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for part in s[1:] for y in part]
    if not xs or not ys:
        raise ValueError("line_plot: nothing to draw")
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = 0.05 * ((max(ys) - min(ys)) or 1.0)
    y0, y1 = min(ys) - pad, max(ys) + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    image = Image.new("RGBA", size, (255, 255, 255, 255))
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw, shade = ImageDraw.Draw(image), ImageDraw.Draw(overlay)
    font, small = _font(14), _font(11)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for y in _ticks(y0, y1):
        _, py = to_px(x0, y)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.text((4, py - 6), f"{y:.3g}", fill=(0, 0, 0), font=small)
    for x in _ticks(x0, x1):
        px, _ = to_px(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 8, height - bottom + 6), f"{x:.3g}", fill=(0, 0, 0), font=small)
    for i, (label, (x, mean, low, high)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        band = [to_px(a, b) for a, b in zip(x, high)] + [to_px(a, b) for a, b in reversed(list(zip(x, low)))]
        if len(band) >= 3:
            shade.polygon(band, fill=color + (50,))
        draw.line([to_px(a, b) for a, b in zip(x, mean)], fill=color, width=2)
        draw.line([width - right + 12, top + 10 + 20 * i, width - right + 36, top + 10 + 20 * i], fill=color, width=3)
        draw.text((width - right + 42, top + 3 + 20 * i), label, fill=(0, 0, 0), font=small)
    image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill=(0, 0, 0), font=font)
    draw.text(((width - right + left) // 2 - 30, height - 22), xlabel, fill=(0, 0, 0), font=small)
    draw.text((4, top - 24), ylabel, fill=(0, 0, 0), font=small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.convert("RGB").save(path)
    return str(path)
