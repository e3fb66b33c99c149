"""Every plot the platform writes keeps its text inside the canvas, with the longest titles the code produces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cag.utils import plots

FIGURES: list = []


@pytest.fixture
def captured(monkeypatch):
    """The figures handed to plots.save, kept open for inspection (saved as usual)."""
    FIGURES.clear()
    real = plots.save

    def keep(fig, path, dpi=120, **kwargs):
        fig.savefig(path, dpi=dpi, **kwargs)
        FIGURES.append(fig)

    monkeypatch.setattr(plots, "save", keep)
    yield FIGURES
    for fig in FIGURES:
        real(fig, Path("/dev/null"), format="png")


def text_outside(fig) -> list[str]:
    """What leaves the figure (half a pixel of slack): the figure's own texts (titles) and, per axes, the box of
    everything it draws (ticks in view, tick labels, axis labels, title, legend)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    w, h = fig.bbox.width, fig.bbox.height

    def outside(bb) -> bool:
        return bb.x0 < -0.5 or bb.y0 < -0.5 or bb.x1 > w + 0.5 or bb.y1 > h + 0.5

    bad = [t.get_text() for t in fig.texts if t.get_visible() and t.get_text().strip()
           and outside(t.get_window_extent(renderer))]
    for ax in fig.axes:
        if outside(ax.get_tightbbox(renderer)):
            bad.append(f"axes {ax.get_title()!r}: {ax.get_tightbbox(renderer)}")
    return bad


def test_the_check_catches_a_title_wider_than_its_figure():
    fig, _ = plots.figure(figsize=(4, 3))
    fig.suptitle("a title much too long to fit the width of this small figure, as fig10's once was " * 2)
    assert text_outside(fig)
    fig.clear()
    fig, _ = plots.figure(figsize=(4, 3))
    plots.suptitle(fig, "a title much too long to fit the width of this small figure, as fig10's once was " * 2)
    assert text_outside(fig) == []


def test_fig10_with_one_panel_and_many_seeds(tmp_path, captured):
    from experiments import fig10, stats

    est = stats.Estimate(3.0, 2.5, 3.5, 12, 300)
    st = {"metrics": list(fig10.PROXY_METRICS),  # the judge did not run: one panel, the narrowest figure
          "configs": {c.label: {"seeds": list(range(12)), "metrics": {m: est for m in fig10.PROXY_METRICS}}
                      for c in fig10.CONFIGS}}
    fig10.plot([], st, tmp_path / "fig10.png")
    assert len(captured) == 1 and text_outside(captured[0]) == []


def test_attention_figure_with_a_long_phrase(captured):
    from cag.attention_maps import PhraseAttention, render_attention_figure
    from cag.data.synthetic import SyntheticConfig, generate_sample

    sample = generate_sample("test", 0, SyntheticConfig(image_size=64))
    phrase = max((g.phrase for g in sample.groundings), key=len) + " with a much longer description of everything"
    n = len(sample.references)
    att = PhraseAttention(phrase=phrase, attention="masked", maps=[torch.rand(4, 4) / 16 for _ in range(n)],
                          token_mass=torch.rand(3), observations=1)
    image = Image.new("RGB", (64, 64))
    render_attention_figure(sample, phrase, {"full": (att, image), "masked": (att, image)})
    assert len(captured) == 1 and text_outside(captured[0]) == []


def test_ladder_curve(tmp_path, captured):
    from experiments import ladder

    points = [{"level": f"level {k} no colours", "seed": 0, "step": s, "proxy_PF_subjects": 2.0 + k,
               "proxy_SC_subjects": 1.0, "proxy_Overall": 4.0} for k in range(5) for s in (500, 1000, 1500)]
    ladder.write_curve(points, tmp_path)
    assert len(captured) == 1 and text_outside(captured[0]) == []
