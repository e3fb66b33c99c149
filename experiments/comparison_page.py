"""The side-by-side HTML page of a sweep: statistics on top, then each test item's references,
target and every configuration's image (embedded, so the page travels as one file)."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.sweep import JUDGE_METRICS, MISSING, PROXY_METRICS, ROOT, TrainedRun
from experiments.tables import by_config, fmt, fmt_ci, statistics_note

log = logging.getLogger("experiments")

# --------------------------------------------------------------------------- visual comparison page


def _data_uri(image: Any, side: int) -> str:
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.open(image)
    im = im.convert("RGB")
    scale = side / max(im.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(image: Any, caption: str, side: int, cls: str = "") -> str:
    cap = html.escape(caption).replace("\n", "<br>")
    if image is None or (isinstance(image, str | Path) and not Path(image).is_file()):
        return f'<figure class="missing {cls}"><div class="none">not on disk</div><figcaption>{cap}</figcaption></figure>'
    return (f'<figure class="{cls}"><img src="{_data_uri(image, side)}" alt="{html.escape(caption.splitlines()[0])}" '
            f'width="{side}" height="{side}"><figcaption>{cap}</figcaption></figure>')


_PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table.stats{border-collapse:collapse;margin:.6em 0 1.2em}
table.stats td,table.stats th{border:1px solid #bbb;padding:.2em .5em;text-align:right;font-size:.85em}
table.stats td:first-child,table.stats th:first-child{text-align:left}
section.item{border-top:1px solid #ccc;padding:.6em 0}
.row{display:flex;flex-wrap:wrap;gap:.5em;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.75em;max-width:150px}
figure img{image-rendering:pixelated;border:1px solid #999}
figure.target img{outline:3px solid #27a}
figure.gen img{outline:3px solid #2a7}
figure.missing .none{width:128px;height:128px;background:#eee;color:#a33;display:flex;align-items:center;justify-content:center}
.sep{width:1px;background:#ccc;align-self:stretch}
.instruction{max-width:70em;font-size:.9em;margin:.2em 0 .5em}
"""


def benchmark_targets(eval_overrides: Sequence[str], keys: Sequence[str], n: int) -> dict[str, Any]:
    """Target images of the test samples (regenerated from the benchmark config the evaluation used), by key."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    # local: as in evaluate_run, torch only when the page needs target images
    from evaluation.runner import load_benchmark

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=list(eval_overrides))
        data = OmegaConf.to_container(cfg.data, resolve=True)
        samples = load_benchmark(data, n)  # type: ignore[arg-type]
    except Exception as exc:  # the page is still useful without targets
        log.warning("targets not available for the HTML page: %s", exc)
        return {}
    wanted = set(keys)
    return {s.key: s.target for s in samples if s.key in wanted and s.target is not None}


def write_comparison_html(
    path: Path,
    title: str,
    runs: Sequence[TrainedRun],
    st: Mapping[str, Any],
    *,
    n_items: int = 8,
    eval_overrides: Sequence[str] = (),
    side: int = 128,
) -> Path:
    """One self-contained page: for ``n_items`` test items spread over the test set, the references, the target
    and every configuration's image (first training seed) with its proxy scores, after the statistics table.

    Images are embedded as base64 PNG, so the file can be attached to MLflow or mailed alone.
    """
    groups = by_config(runs)
    first = {label: min(rs, key=lambda r: r.seed) for label, rs in groups.items()}
    any_run = next((r for r in first.values() if r.samples), None)
    keys = list(any_run.samples) if any_run else []
    if keys and n_items > 0:
        step = max(1, len(keys) // n_items)
        chosen = keys[::step][:n_items]
    else:
        chosen = []
    targets = benchmark_targets(eval_overrides, chosen, len(keys)) if chosen else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_PAGE_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    # statistics table
    metrics = st.get("metrics", [])
    parts.append("<table class='stats'><tr><th>configuration</th><th>seeds</th>"
                 + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>")
    for label, info in st.get("configs", {}).items():
        cells = "".join(f"<td>{html.escape(fmt_ci(info['metrics'].get(m)))}</td>" for m in metrics)
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{len(info['seeds'])}</td>{cells}</tr>")
    parts.append("</table>")
    overall = [p for p in st.get("paired", []) if p["metric"] in ("Overall", "proxy_Overall")]
    if overall:
        parts.append("<table class='stats'><tr><th>paired difference</th><th>metric</th><th>Δ [95% CI]</th>"
                     "<th>paper Δ</th><th>sign agrees</th></tr>")
        for p in overall:
            paper = MISSING if p["paper_delta"] is None else f"{p['paper_delta']:+.3f}"
            agrees = MISSING if p["agrees"] is None else ("yes" if p["agrees"] else "NO")
            parts.append(f"<tr><td>{html.escape(p['comparison'])}</td><td>{p['metric']}</td>"
                         f"<td>{html.escape(fmt_ci(p['estimate']))}</td><td>{paper}</td><td>{agrees}</td></tr>")
        parts.append("</table>")
    parts.append(f"<p class='note'>{html.escape(statistics_note(st, runs))} Images below: training seed "
                 f"{min((r.seed for r in runs), default=0)} of each configuration, same sampling noise per item.</p>")
    for key in chosen:
        ref_run = any_run
        assert ref_run is not None
        parts.append(f"<section class='item' data-key='{html.escape(key)}'><h3>{html.escape(key)} "
                     f"<small>({html.escape(ref_run.task_types.get(key, ''))})</small></h3>")
        parts.append(f"<div class='instruction'>{html.escape(ref_run.instructions.get(key, ''))}</div><div class='row'>")
        for i, ref in enumerate(ref_run.references.get(key, []), start=1):
            parts.append(_figure(ref, f"reference {i}", side))
        parts.append(_figure(targets.get(key), "target", side, "target"))
        parts.append("<div class='sep'></div>")
        for label, r in first.items():
            s = r.samples.get(key, {})
            score = " ".join(f"{m.removeprefix('proxy_')} {fmt(s.get(m), 2)}" for m in PROXY_METRICS)
            judge = " ".join(f"{m} {fmt(s.get(m), 1)}" for m in JUDGE_METRICS if s.get(m) is not None)
            caption = f"{label}\nproxy {score}" + (f"\njudge {judge}" if judge else "")
            parts.append(_figure(r.images.get(key), caption, side, "gen"))
        parts.append("</div></section>")
    if not chosen:
        parts.append("<p>No per-sample results in MLflow for these runs.</p>")
    # lets a headless browser report how many images decoded (tests/experiments read it with --dump-dom)
    parts.append("<script>window.addEventListener('load',function(){var n=0;for(var i of document.images)"
                 "{if(i.complete&&i.naturalWidth>0)n++;}document.body.setAttribute('data-images-loaded',n);});"
                 "</script></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path

