"""Evaluation outputs: per-sample JSONL, a Table-1-style summary (Markdown + CSV), an HTML page.

The summary reproduces the paper's Table 1 layout (Method | PF | SC | Overall | DINO |
CLIP-I | CLIP-T, three decimals) so our runs can be laid next to the published rows. A
metric that was skipped (weights not available offline, judge unreachable) is written
as "—", never as 0, so a missing number cannot be mistaken for a bad one.

The HTML page embeds every image as a base64 PNG thumbnail: one file that can be copied,
attached as an MLflow artifact or mailed without its image folder and still shows
everything. ``embed=False`` writes relative links instead, for very large runs. The target
(ground truth, when the data has one) sits next to the generated image at the same display
size, upscaled without smoothing, so a 64 px sample can be judged pixel by pixel.

:func:`write_sample_grid` draws a few samples as one PNG (references | target | generated)
for the MLflow run, where a picture next to the numbers is seen without opening the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cag.utils.images import grid_image
from evaluation.aggregate import task_type_means

# (key in scores, column title) in the order of the paper's Table 1
COLUMNS: tuple[tuple[str, str], ...] = (
    ("pf", "PF"),
    ("sc", "SC"),
    ("overall", "Overall"),
    ("dino", "DINO"),
    ("clip_i", "CLIP-I"),
    ("clip_t", "CLIP-T"),
)
MISSING = "—"


@dataclass
class SampleResult:
    """Everything recorded about one evaluated sample; image fields are paths, so the record is plain JSON.

    ``scores`` maps a metric key (see :data:`COLUMNS`) to its value, or ``None`` when that
    metric failed or was skipped for this sample (a failure is recorded, never turned
    into a number). ``details`` holds whatever explains the scores (judge reasoning,
    per-subject proxy scores, error messages).
    """

    key: str
    instruction: str
    scores: dict[str, float | None]
    task_type: str = "default"
    generated: str | None = None
    references: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    target: str | None = None  # ground-truth image, when the benchmark has one (the synthetic one always does)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "task_type": self.task_type,
            "instruction": self.instruction,
            "scores": {k: _finite_or_none(v) for k, v in self.scores.items()},
            "generated": self.generated,
            "references": list(self.references),
            "target": self.target,
            "details": self.details,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SampleResult:
        return cls(
            key=str(obj["key"]),
            instruction=str(obj.get("instruction", "")),
            scores={k: None if v is None else float(v) for k, v in dict(obj.get("scores", {})).items()},
            task_type=str(obj.get("task_type", "default")),
            generated=obj.get("generated"),
            references=list(obj.get("references", [])),
            details=dict(obj.get("details", {})),
            target=obj.get("target"),
        )


def _finite_or_none(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- per-sample results


def write_results_jsonl(path: str | os.PathLike[str], results: Iterable[SampleResult]) -> Path:
    """One JSON object per line, NaN written as null, so any JSON reader (and ``jq``) can consume it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
    return out


def read_results_jsonl(path: str | os.PathLike[str]) -> list[SampleResult]:
    """Inverse of :func:`write_results_jsonl`; lets a summary be rebuilt without re-running the evaluation."""
    with Path(path).open(encoding="utf-8") as f:
        return [SampleResult.from_json(json.loads(line)) for line in f if line.strip()]


# --------------------------------------------------------------------------- summary


@dataclass
class RunSummary:
    """One row of the summary table, with how many samples each number rests on."""

    method: str
    metrics: dict[str, float | None]
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)  # metric -> (valid, total)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed


def summarise(
    method: str,
    results: Sequence[SampleResult],
    skipped: Mapping[str, str] | None = None,
    by_task_type: bool = True,
) -> RunSummary:
    """A run's table row: :func:`evaluation.aggregate.task_type_means` of its samples' scores.

    It is the rule of :func:`evaluation.aggregate.summarize` too, so a row and the judge
    summary of the same scores agree: Overall per sample, means per task type, then
    unweighted over task types (one group when ``by_task_type`` is False). ``coverage``
    counts the samples behind each number; a metric in ``skipped`` is None.
    """
    skipped = dict(skipped or {})
    means = task_type_means(
        [(r.task_type if by_task_type else "all", r.scores) for r in results],
        [k for k, _ in COLUMNS],
        overall=("pf", "sc", "overall"),
    )
    metrics = {k: None if k in skipped else m["mean"] for k, m in means.items()}
    coverage = {k: (m["scored"], len(results)) for k, m in means.items()}
    return RunSummary(method=method, metrics=metrics, coverage=coverage, skipped=skipped)


def _cell(v: float | None) -> str:
    v = _finite_or_none(v)
    return MISSING if v is None else f"{v:.3f}"


def format_markdown_table(rows: Sequence[RunSummary]) -> str:
    """Table 1 as GitHub Markdown: one row per run, "—" where a metric was not computed."""
    header = "| Method | " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [header, sep]
    for row in rows:
        name = row.method.replace("|", "\\|")
        lines.append(f"| {name} | " + " | ".join(_cell(row.metrics.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_summary_tables(out_stem: str | os.PathLike[str], rows: Sequence[RunSummary]) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` (UTF-8, same cells, "—" for a skipped metric)."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    md.write_text(format_markdown_table(rows), encoding="utf-8")
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Method", *(title for _, title in COLUMNS)])
        for row in rows:
            writer.writerow([row.method, *(_cell(row.metrics.get(k)) for k, _ in COLUMNS)])
    return md, csv_path


def write_summary_json(path: str | os.PathLike[str], rows: Sequence[RunSummary]) -> Path:
    """The numbers behind the table plus coverage and skip reasons, which the table has no room for."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = [
        {
            "method": r.method,
            "metrics": {k: _finite_or_none(v) for k, v in r.metrics.items()},
            "coverage": {k: {"valid": v[0], "total": v[1]} for k, v in r.coverage.items()},
            "skipped": r.skipped,
        }
        for r in rows
    ]
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- HTML


def _thumbnail_data_uri(path: Path, max_side: int) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(
    rel: str | None,
    root: Path,
    html_dir: Path,
    caption: str,
    embed: bool,
    max_side: int,
    display: int,
    css_class: str = "",
) -> str:
    """A captioned image in a ``display`` x ``display`` CSS box.

    The box size is set on the element, not derived from the file, so the target and the
    generated image line up at one size whatever their pixel sizes; ``object-fit`` keeps
    the aspect ratio of non-square references.
    """
    cap = html.escape(caption)
    cls = f' class="{css_class}"' if css_class else ""
    if not rel:
        return f'<figure class="missing {css_class}"><figcaption>{cap}: none</figcaption></figure>'
    src_path = _image_path(rel, root)
    if not src_path.is_file():
        return (
            f'<figure class="missing {css_class}"><figcaption>{cap}: missing {html.escape(str(rel))}'
            "</figcaption></figure>"
        )
    if embed:
        src = _thumbnail_data_uri(src_path, max_side)
    else:
        src = Path(os.path.relpath(src_path.resolve(), html_dir.resolve())).as_posix()
    return (
        f'<figure{cls}><img src="{html.escape(src, quote=True)}" alt="{cap}" width="{display}" '
        f'height="{display}"><figcaption>{cap}</figcaption></figure>'
    )


def _image_path(rel: str, root: Path) -> Path:
    return Path(rel) if Path(rel).is_absolute() else root / rel


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.summary{border-collapse:collapse;margin-bottom:1.5em}
table.summary td,table.summary th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
table.summary td:first-child,table.summary th:first-child{text-align:left}
section.sample{border-top:1px solid #ccc;padding:.8em 0}
.images{display:flex;flex-wrap:wrap;gap:.8em;align-items:flex-end}
.images .sep{width:1px;align-self:stretch;background:#ccc;margin:0 .4em}
figure{margin:0;text-align:center;font-size:.85em}
figure img{display:block;object-fit:contain;image-rendering:pixelated;background:#eee}
figure.target img{outline:3px solid #888}
figure.gen img{outline:3px solid #2a7}
figure.missing{color:#a33}
.instruction{max-width:60em;white-space:pre-wrap}
table.scores td{padding:0 .6em 0 0}
"""


def write_html(
    path: str | os.PathLike[str],
    results: Sequence[SampleResult],
    image_root: str | os.PathLike[str] | None = None,
    title: str = "CAG evaluation",
    summary: Sequence[RunSummary] = (),
    embed: bool = True,
    thumb_size: int = 256,
    display_size: int = 256,
) -> Path:
    """One page: the summary table, then per sample its references, target, generated image, instruction and scores.

    Image paths in the results are relative to ``image_root`` (default: the page's
    folder). Embedded thumbnails are at most ``thumb_size`` pixels on their long side
    (smaller images are embedded as they are), which keeps a 300-sample page of 128 px
    images to a few megabytes. On screen the target and the generated image are both
    ``display_size`` CSS pixels square and the references three quarters of that, so the
    pair to compare is the same size and the largest; ``image-rendering: pixelated``
    upscales small images without blurring away the details being judged.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(image_root) if image_root is not None else out.parent
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if summary:
        parts.append('<table class="summary"><tr><th>Method</th>')
        parts.append("".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS) + "</tr>")
        for row in summary:
            cells = "".join(f"<td>{_cell(row.metrics.get(k))}</td>" for k, _ in COLUMNS)
            parts.append(f"<tr><td>{html.escape(row.method)}</td>{cells}</tr>")
        parts.append("</table>")
    for r in results:
        anchor = html.escape(r.key, quote=True)
        parts.append(f'<section class="sample" id="{anchor}"><h2>{html.escape(r.key)}</h2>')
        parts.append(f"<p>task type: {html.escape(r.task_type)}</p>")
        parts.append('<div class="images">')
        ref_display = max(1, display_size * 3 // 4)
        for k, ref in enumerate(r.references, start=1):
            parts.append(_img_tag(ref, root, out.parent, f"Fig.{k}", embed, thumb_size, ref_display, "ref"))
        parts.append('<div class="sep"></div>')
        if r.target:
            parts.append(_img_tag(r.target, root, out.parent, "target", embed, thumb_size, display_size, "target"))
        parts.append(_img_tag(r.generated, root, out.parent, "generated", embed, thumb_size, display_size, "gen"))
        parts.append("</div>")
        parts.append(f'<p class="instruction">{html.escape(r.instruction)}</p>')
        rows = "".join(
            f"<tr><td>{html.escape(title)}</td><td>{_cell(r.scores.get(key))}</td></tr>"
            for key, title in COLUMNS
            if key in r.scores
        )
        parts.append(f'<table class="scores">{rows}</table>')
        if r.details:
            details = html.escape(json.dumps(r.details, indent=1, ensure_ascii=False, default=str))
            parts.append(f"<details><summary>details</summary><pre>{details}</pre></details>")
        parts.append("</section>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- image grid

GRID_SAMPLES = 6


def write_sample_grid(
    path: str | os.PathLike[str],
    results: Sequence[SampleResult],
    image_root: str | os.PathLike[str] | None = None,
    num_samples: int = GRID_SAMPLES,
    cell_size: int | None = None,
) -> Path | None:
    """``references | target | generated`` for the first ``num_samples`` samples that have a generated image, as one PNG.

    Drawn by :func:`cag.utils.images.grid_image`, as the training callbacks' grid, so a validation grid
    during training and the evaluation's grid read the same way. ``cell_size`` None uses
    the generated images' own size (at most 256 px): the grid is for the MLflow run page,
    where a small picture next to the numbers is the point. Returns None when no sample
    has a readable generated image (nothing to draw).
    """
    root = Path(image_root) if image_root is not None else Path(path).parent
    refs: list[list[Image.Image]] = []
    targets: list[Image.Image | None] = []
    generated: list[Image.Image] = []
    for r in results:
        if len(generated) >= num_samples:
            break
        gen = _open_or_none(r.generated, root)
        if gen is None:
            continue
        refs.append([im for im in (_open_or_none(p, root) for p in r.references) if im is not None])
        targets.append(_open_or_none(r.target, root))
        generated.append(gen)
    if not generated:
        return None
    size = cell_size or min(256, max(generated[0].size))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # grid_image sizes its columns by the longest reference list; at least one column keeps the labels apart
    if not any(refs):
        refs[0] = [Image.new("RGB", (size, size), "white")]
    grid_image(refs, targets, generated, size).save(out, format="PNG")
    return out


def _open_or_none(rel: str | None, root: Path) -> Image.Image | None:
    if not rel:
        return None
    try:
        with Image.open(_image_path(rel, root)) as im:
            return im.convert("RGB")
    except (OSError, ValueError):  # missing or unreadable: left out of the grid, as the page marks it
        return None
