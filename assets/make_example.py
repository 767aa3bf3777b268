"""Draw assets/refdiff-example.png, the image the reference workflows segment: two horses on a meadow, a brown
one on the left and a white one on the right, so "the horse on the left" names exactly one of them.

Drawn with PIL shapes only (no photograph, no model): python assets/make_example.py
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "refdiff-example.png"
SIZE = (512, 384)  # W, H
SKY_TOP, SKY_BOTTOM = (118, 170, 222), (196, 222, 240)
GRASS_TOP, GRASS_BOTTOM = (112, 168, 74), (70, 128, 48)
HORIZON = 200  # y of the meadow's far edge


def gradient(draw: ImageDraw.ImageDraw, top: int, bottom: int, start: tuple, end: tuple) -> None:
    """Fill rows top..bottom with a vertical colour gradient."""
    for y in range(top, bottom):
        t = (y - top) / max(1, bottom - top - 1)
        draw.line([(0, y), (SIZE[0], y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(start, end)))


def horse(draw: ImageDraw.ImageDraw, x: int, y: int, scale: float, facing: int, coat: tuple, mane: tuple) -> None:
    """A side-view horse: (x, y) is the middle of its back, ``facing`` +1 = head to the right, -1 = to the left."""

    def pt(dx: float, dy: float) -> tuple[float, float]:
        return x + facing * dx * scale, y + dy * scale

    def box(dx0: float, dy0: float, dx1: float, dy1: float) -> list[float]:
        (ax, ay), (bx, by) = pt(dx0, dy0), pt(dx1, dy1)
        return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]

    hoof = tuple(max(0, c - 90) for c in coat)
    draw.ellipse([pt(-4, 76)[0] - 62 * scale, pt(0, 76)[1] - 6 * scale,
                  pt(4, 76)[0] + 62 * scale, pt(0, 76)[1] + 6 * scale], fill=(58, 104, 40))  # shadow
    for dx in (-44, -30, 30, 44):  # legs, the far pair darker
        shade = coat if dx in (-44, 30) else tuple(max(0, c - 30) for c in coat)
        draw.rectangle(box(dx - 5, 10, dx + 5, 70), fill=shade)
        draw.rectangle(box(dx - 6, 68, dx + 6, 76), fill=hoof)
    draw.polygon([pt(-58, -4), pt(-74, 8), pt(-80, 46), pt(-70, 48), pt(-62, 14)], fill=mane)  # tail
    draw.ellipse(box(-62, -22, 62, 30), fill=coat)  # body
    draw.polygon([pt(38, -10), pt(58, -60), pt(76, -62), pt(62, 6)], fill=coat)  # neck
    draw.polygon([pt(58, -64), pt(100, -44), pt(102, -32), pt(88, -28), pt(62, -40)], fill=coat)  # head
    draw.polygon([pt(60, -70), pt(64, -82), pt(70, -66)], fill=coat)  # ear
    draw.polygon([pt(40, -12), pt(56, -62), pt(62, -66), pt(48, -10)], fill=mane)  # mane
    ex, ey = pt(76, -50)
    draw.ellipse([ex - 2.5 * scale, ey - 2.5 * scale, ex + 2.5 * scale, ey + 2.5 * scale], fill=(20, 16, 14))


def draw_example() -> Image.Image:
    image = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(image)
    gradient(draw, 0, HORIZON, SKY_TOP, SKY_BOTTOM)
    gradient(draw, HORIZON, SIZE[1], GRASS_TOP, GRASS_BOTTOM)
    draw.ellipse([380, 34, 430, 84], fill=(255, 236, 170))  # sun
    horse(draw, 140, 222, 1.05, +1, coat=(126, 74, 38), mane=(52, 30, 18))  # brown, facing right
    horse(draw, 380, 226, 0.95, -1, coat=(232, 230, 224), mane=(150, 146, 140))  # white, facing left
    return image


if __name__ == "__main__":
    draw_example().save(OUT, optimize=True)
    print(OUT)
