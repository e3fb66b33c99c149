"""Helpers of the report tests: sample images on disk, and the summary table read back into numbers.

The evaluation writes images and tables; only the tests need to build image folders by hand
or to turn a written ``summary.md`` back into numbers to compare, so these live here.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from evaluation.report import COLUMNS, MISSING


def save_image(image: Image.Image, out_dir: str | os.PathLike[str], name: str) -> str:
    """Write ``image`` as PNG under ``out_dir`` and return its path relative to ``out_dir`` (for the JSONL)."""
    root = Path(out_dir)
    target = root / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")
    return target.relative_to(root).as_posix()


def parse_markdown_table(text: str) -> dict[str, dict[str, float | None]]:
    """Read a table written by :func:`evaluation.report.format_markdown_table` back into numbers (None for "—")."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        raise ValueError("no Markdown table found")
    titles = [c.strip() for c in _split_row(lines[0])]
    by_title = {title: key for key, title in COLUMNS}
    out: dict[str, dict[str, float | None]] = {}
    for line in lines[2:]:
        cells = [c.strip() for c in _split_row(line)]
        if len(cells) != len(titles):
            raise ValueError(f"row {line!r} has {len(cells)} cells, header has {len(titles)}")
        method = cells[0].replace("\\|", "|")
        out[method] = {
            by_title[t]: (None if c == MISSING else float(c))
            for t, c in zip(titles[1:], cells[1:], strict=True)
        }
    return out


def _split_row(line: str) -> list[str]:
    body = line.strip()[1:-1]
    cells, cur, i = [], "", 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cur += "\\|"
            i += 2
            continue
        if body[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += body[i]
        i += 1
    cells.append(cur)
    return cells
