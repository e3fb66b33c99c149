"""report.html as a browser draws it: target and generated image side by side, equal size, large, sharp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from report_support import save_image

from evaluation.report import SampleResult, summarise, write_html
from tests.browser import chromium_or_skip, screenshot

TARGET = (255, 0, 255)
GENERATED = (0, 255, 255)
REFS = ((255, 255, 0), (0, 128, 0))


def _checker(colour: tuple[int, int, int], size: int = 64, cell: int = 8) -> Image.Image:
    """Colour / black squares: any smoothing while upscaling leaves blended pixels at every edge."""
    yy, xx = np.mgrid[0:size, 0:size]
    a = np.zeros((size, size, 3), np.uint8)
    a[((yy // cell + xx // cell) % 2) == 0] = colour
    return Image.fromarray(a)


def _box(shot: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the pixels of exactly ``colour`` in the screenshot."""
    ys, xs = np.nonzero(np.all(np.abs(shot.astype(int) - colour) <= 6, axis=-1))
    assert len(xs), f"no pixel of colour {colour} on the page"
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _share_of_other_colours(shot: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> float:
    """Fraction of pixels in ``box`` that are neither ``colour`` nor black (blurred edges)."""
    x, y, w, h = box
    crop = shot[y : y + h, x : x + w].astype(int)
    pure = np.all(np.abs(crop - colour) <= 6, axis=-1) | np.all(crop <= 6, axis=-1)
    return float(1.0 - pure.mean())


def test_report_shows_target_and_generated_at_equal_judgeable_size_in_chromium(tmp_path: Path) -> None:
    chromium_or_skip()
    key = "test-000000"
    refs = [save_image(Image.new("RGB", (40, 30), c), tmp_path, f"{key}/ref{k}") for k, c in enumerate(REFS)]
    result = SampleResult(
        key=key,
        instruction="Rin (Fig.1) waves at Kai (Fig.2)",
        scores={"pf": 7.0, "sc": 6.0},
        generated=save_image(_checker(GENERATED), tmp_path, f"{key}/generated"),
        references=refs,
        target=save_image(_checker(TARGET), tmp_path, f"{key}/target"),
    )
    page = write_html(tmp_path / "report.html", [result], summary=[summarise("run", [result])], display_size=256)
    shot = np.asarray(screenshot(page, tmp_path / "shot.png"))

    target, generated = _box(shot, TARGET), _box(shot, GENERATED)
    assert target[2:] == generated[2:] == (256, 256), (target, generated)  # same display size, 4x the 64 px image
    assert target[1] == generated[1] and target[0] + 256 <= generated[0], "side by side, target first"
    # image-rendering: pixelated keeps the 8 px squares crisp; a smoothed upscale blends ~20% of the pixels
    assert _share_of_other_colours(shot, target, TARGET) < 0.01
    assert _share_of_other_colours(shot, generated, GENERATED) < 0.01
    # the references are on screen too, left of the target, aspect kept (40x30 -> 192x144)
    for colour in REFS:
        x, _, w, h = _box(shot, colour)
        assert (w, h) == (192, 144) and x + w <= target[0]
