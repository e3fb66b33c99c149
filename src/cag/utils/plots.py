"""Figures whose text stays inside the canvas: constrained layout and titles wrapped to the figure's width.

Why one place: a long title (a phrase, a seed count) used to run past both edges of a
figure saved with ``tight_layout``, which moves axes but never wraps or shrinks a suptitle.
Every plot the platform writes is made with :func:`figure` and titled with :func:`suptitle`.
"""

from __future__ import annotations

import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# average glyph width as a share of the font size, for DejaVu Sans (matplotlib's default); generous on purpose
_CHAR_WIDTH = 0.62


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` with constrained layout and a 2-D array of axes."""
    return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kwargs)


def wrap_to(fig: Any, text: str, fontsize: float, share: float = 0.96) -> str:
    """``text`` broken into lines that fit ``share`` of the figure's width at ``fontsize`` points."""
    width_pt = fig.get_figwidth() * 72 * share
    chars = max(10, int(width_pt / (fontsize * _CHAR_WIDTH)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def suptitle(fig: Any, text: str, fontsize: float = 11) -> Any:
    """A figure title wrapped to the figure's width (constrained layout makes room for every line)."""
    return fig.suptitle(wrap_to(fig, text, fontsize), fontsize=fontsize)


def axes_title(ax: Any, text: str, fontsize: float = 10) -> Any:
    """An axes title wrapped to the axes' share of the figure's width."""
    fig = ax.get_figure()
    share = ax.get_position().width * 0.96
    return ax.set_title(wrap_to(fig, text, fontsize, share), fontsize=fontsize)


def save(fig: Any, path: Any, dpi: int = 120, **kwargs: Any) -> None:
    fig.savefig(path, dpi=dpi, **kwargs)
    plt.close(fig)
