"""Image layouts shared by training and evaluation, kept free of torch so evaluation reports load fast.

The validation grid logged during training and the sample grid of an evaluation report
use the same picture, so a reader compares them at a glance.
"""

from __future__ import annotations

from PIL import Image, ImageDraw


def grid_image(references: list[list[Image.Image]], targets: list[Image.Image | None], generated: list[Image.Image],
               size: int, pad: int = 2) -> Image.Image:
    """Rows of ``references | target | generated`` at ``size`` px, a gap before the generated column."""
    cols = max(len(r) for r in references) + 2
    label_h = 12
    width = cols * (size + pad) + 2 * pad
    canvas = Image.new("RGB", (width, label_h + len(generated) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    ncols = cols - 2
    for c, text in [(0, "references"), (ncols, "target"), (ncols + 1, "generated")]:
        draw.text((c * (size + pad) + (2 * pad if c == ncols + 1 else 0), 0), text, fill="black")
    for r, (refs, tgt, gen) in enumerate(zip(references, targets, generated, strict=True)):
        y = label_h + r * (size + pad)
        for c, ref in enumerate(refs):
            canvas.paste(ref.resize((size, size)), (c * (size + pad), y))
        if tgt is not None:
            canvas.paste(tgt.resize((size, size)), (ncols * (size + pad), y))
        canvas.paste(gen.resize((size, size)), ((ncols + 1) * (size + pad) + 2 * pad, y))
    return canvas
