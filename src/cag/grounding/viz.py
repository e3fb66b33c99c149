"""Fig. 9-style overlays: each phrase's box and label drawn on its reference image.

Checking a handful of overlays is the quickest way to see whether a coordinate
convention is wrong (boxes squeezed into a corner) or labels attach to the wrong
reference, before thousands of samples are grounded that way.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cag.data.sample import BOX_SCALE, Grounding

_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_alignment(
    references: Sequence[Image.Image],
    groundings: Sequence[Grounding],
    instruction: str | None = None,
    panel_height: int = 384,
) -> Image.Image:
    """References side by side (scaled to one height), boxes and labels on top, instruction below."""
    panels = []
    for ref in references:
        scale = panel_height / ref.height
        panels.append(ref.convert("RGB").resize((max(1, round(ref.width * scale)), panel_height)))
    gap = 8
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    font = _font(max(12, panel_height // 28))
    text_lines: list[str] = []
    if instruction:
        avg_char = max(1.0, font.getlength("the quick brown fox") / 19)
        chars = max(20, int((width - 2 * gap) / avg_char))
        text_lines = textwrap.wrap(instruction, chars)
    line_h = font.getbbox("Ag")[3] + 4
    height = panel_height + 2 * gap + line_h * (len(text_lines) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    offsets = []
    x = gap
    for i, p in enumerate(panels):
        canvas.paste(p, (x, gap))
        draw.text(
            (x + 4, gap + p.height - line_h - 4),  # bottom-left: box labels sit at the top
            f"Fig.{i + 1}",
            fill=(255, 255, 255),
            font=font,
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
        offsets.append(x)
        x += p.width + gap
    colours: dict[str, tuple[int, int, int]] = {}
    labels: list[tuple[tuple[float, float], str, tuple[int, int, int]]] = []
    for g in groundings:
        if not 1 <= g.image_id <= len(panels):
            continue
        colour = colours.setdefault(g.phrase, _PALETTE[len(colours) % len(_PALETTE)])
        p = panels[g.image_id - 1]
        ox = offsets[g.image_id - 1]
        x1, y1, x2, y2 = g.bbox_2d
        box = (
            ox + x1 / BOX_SCALE * p.width,
            gap + y1 / BOX_SCALE * p.height,
            ox + x2 / BOX_SCALE * p.width,
            gap + y2 / BOX_SCALE * p.height,
        )
        draw.rectangle(box, outline=colour, width=3)
        labels.append(((box[0] + 3, box[1] + 3), g.phrase, colour))
    # Labels after all boxes, each pushed down past labels already placed: a character's
    # box and its hair box share a top edge, and their labels would otherwise overprint.
    placed: list[tuple[float, float, float, float]] = []
    for (lx, ly), text, colour in labels:
        tb = draw.textbbox((lx, ly), text, font=font)
        for _ in range(len(placed)):
            hit = next((q for q in placed if _intersects(tb, q)), None)
            if hit is None:
                break
            ly += hit[3] - tb[1] + 1
            tb = draw.textbbox((lx, ly), text, font=font)
        placed.append(tb)
        draw.rectangle(tb, fill=colour)
        draw.text((lx, ly), text, fill=(255, 255, 255), font=font)
    y = panel_height + 2 * gap
    for line in text_lines:
        draw.text((gap, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    return canvas


def _intersects(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def save_alignment(
    path: str | Path,
    references: Sequence[Image.Image],
    groundings: Sequence[Grounding],
    instruction: str | None = None,
) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    draw_alignment(references, groundings, instruction).save(p, format="PNG")
    return p
