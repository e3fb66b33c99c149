"""Per-sample JSONL, Table-1 summary (Markdown / CSV / JSON) and the HTML page."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_support import parse_markdown_table, save_image

from evaluation.report import (
    MISSING,
    RunSummary,
    SampleResult,
    format_markdown_table,
    read_results_jsonl,
    summarise,
    write_html,
    write_results_jsonl,
    write_sample_grid,
    write_summary_json,
    write_summary_tables,
)


def _results(tmp_path: Path) -> list[SampleResult]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    out = []
    for i, (task, pf, sc, dino) in enumerate(
        [("multi", 8.0, 2.0, 0.5), ("multi", 6.0, 6.0, 0.7), ("single", 9.0, 4.0, None)]
    ):
        key = f"test-{i:06d}"
        refs = [
            save_image(Image.new("RGB", (40, 30), c), tmp_path, f"{key}/ref{k}")
            for k, c in enumerate(colours[:2])
        ]
        gen = save_image(Image.new("RGB", (64, 64), colours[2 + i % 2]), tmp_path, f"{key}/generated")
        out.append(
            SampleResult(
                key=key,
                instruction=f"Rin (Fig.1) stands <left> & waves #{i}",
                scores={"pf": pf, "sc": sc, "dino": dino, "clip_t": 0.3 + i / 100},
                task_type=task,
                generated=gen,
                references=refs,
                details={"pf_subjects": {"Rin": pf / 10}},
            )
        )
    return out


def test_jsonl_round_trips_and_writes_failures_as_null(tmp_path: Path) -> None:
    results = _results(tmp_path)
    results[0].scores["sc"] = float("nan")  # a failed judge call must not become a number
    path = write_results_jsonl(tmp_path / "out" / "samples.jsonl", results)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["key"] == "test-000000" and first["scores"]["sc"] is None
    back = read_results_jsonl(path)
    assert [r.key for r in back] == [r.key for r in results]
    assert back[1].scores == results[1].scores and back[1].references == results[1].references
    assert back[0].scores["sc"] is None


def test_summary_overall_is_mean_of_per_sample_geometric_means_per_task_type(tmp_path: Path) -> None:
    results = _results(tmp_path)
    s = summarise("run", results)
    # multi: overall sqrt(16)=4, sqrt(36)=6 -> 5; single: sqrt(36)=6; unweighted over task types -> 5.5
    assert s.metrics["overall"] == pytest.approx(5.5)
    assert s.metrics["pf"] == pytest.approx((7.0 + 9.0) / 2)
    assert s.metrics["dino"] == pytest.approx(0.6)  # only the multi task type has DINO values
    assert s.coverage["dino"] == (2, 3)
    assert s.metrics["clip_i"] is None
    flat = summarise("run", results, by_task_type=False)
    assert flat.metrics["overall"] == pytest.approx((4 + 6 + 6) / 3)


def test_skipped_metric_is_none_even_if_some_values_exist(tmp_path: Path) -> None:
    s = summarise("run", _results(tmp_path), skipped={"dino": "weights not cached"})
    assert s.metrics["dino"] is None and s.skipped == {"dino": "weights not cached"}


def test_markdown_table_has_table1_columns_and_parses_back(tmp_path: Path) -> None:
    rows = [
        RunSummary(
            "CAG (ours)",
            {"pf": 7.308, "sc": 7.906, "overall": 7.568, "dino": 0.526, "clip_i": 0.72, "clip_t": 0.319},
        ),
        RunSummary(
            "baseline | no mask",
            {"pf": 6.7971, "sc": 7.6534, "overall": 7.1772, "dino": None, "clip_i": None},
        ),
    ]
    text = format_markdown_table(rows)
    assert text.splitlines()[0] == "| Method | PF | SC | Overall | DINO | CLIP-I | CLIP-T |"
    assert "| 7.308 | 7.906 | 7.568 | 0.526 | 0.720 | 0.319 |" in text
    assert f"| 6.797 | 7.653 | 7.177 | {MISSING} | {MISSING} | {MISSING} |" in text
    parsed = parse_markdown_table(text)
    assert parsed["CAG (ours)"] == {
        "pf": 7.308,
        "sc": 7.906,
        "overall": 7.568,
        "dino": 0.526,
        "clip_i": 0.72,
        "clip_t": 0.319,
    }
    assert parsed["baseline | no mask"]["pf"] == pytest.approx(6.797)
    assert parsed["baseline | no mask"]["dino"] is None and parsed["baseline | no mask"]["clip_t"] is None


def test_summary_files_are_written_as_markdown_csv_and_json(tmp_path: Path) -> None:
    rows = [
        summarise("run A", _results(tmp_path), skipped={"clip_i": "no CLIP"}),
        RunSummary("run B", {"pf": 1.0}),
    ]
    md, csv_path = write_summary_tables(tmp_path / "tables" / "table1", rows)
    assert md.name == "table1.md" and csv_path.name == "table1.csv"
    assert parse_markdown_table(md.read_text(encoding="utf-8"))["run A"]["overall"] == pytest.approx(5.5)
    with csv_path.open(encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["Method", "PF", "SC", "Overall", "DINO", "CLIP-I", "CLIP-T"]
    assert table[1][0] == "run A" and table[1][3] == "5.500" and table[1][5] == MISSING
    assert table[2] == ["run B", "1.000", MISSING, MISSING, MISSING, MISSING, MISSING]
    payload = json.loads(write_summary_json(tmp_path / "summary.json", rows).read_text(encoding="utf-8"))
    assert payload[0]["skipped"] == {"clip_i": "no CLIP"}
    assert payload[0]["coverage"]["dino"] == {"valid": 2, "total": 3}


def test_html_embeds_every_sample_key_and_its_images(tmp_path: Path) -> None:
    results = _results(tmp_path)
    page = write_html(tmp_path / "report.html", results, summary=[summarise("run", results)], thumb_size=32)
    text = page.read_text(encoding="utf-8")
    for r in results:
        assert f'id="{r.key}"' in text
    sections = text.split('<section class="sample"')[1:]
    assert len(sections) == 3
    for section in sections:
        uris = re.findall(r'src="data:image/png;base64,([^"]+)"', section)
        assert len(uris) == 3  # two references + the generated image
        sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
        assert max(max(s) for s in sizes) <= 32  # thumbnails, not the full images
    # the generated image of sample 0 is blue: its embedded pixel proves the right file was used
    gen0 = re.findall(r'<figure class="gen"><img src="data:image/png;base64,([^"]+)"', sections[0])[0]
    assert Image.open(io.BytesIO(base64.b64decode(gen0))).convert("RGB").getpixel((0, 0)) == (30, 30, 200)
    assert "&lt;left&gt; &amp; waves" in text  # instruction is escaped, not interpreted
    assert "8.000" in sections[0] and MISSING in sections[2]  # scores, "—" for sample 2's DINO


def test_html_links_images_relatively_when_not_embedding(tmp_path: Path) -> None:
    results = _results(tmp_path)
    page = write_html(tmp_path / "pages" / "report.html", results, image_root=tmp_path, embed=False)
    text = page.read_text(encoding="utf-8")
    assert "base64" not in text
    links = re.findall(r'<img src="([^"]+)"', text)
    assert len(links) == 9
    assert all((page.parent / link).resolve().is_file() for link in links)


def test_html_marks_a_missing_image_instead_of_failing(tmp_path: Path) -> None:
    r = _results(tmp_path)[0]
    r.generated = "nowhere/gone.png"
    text = write_html(tmp_path / "r.html", [r]).read_text(encoding="utf-8")
    assert "missing nowhere/gone.png" in text


def test_report_row_and_judge_summary_of_the_same_records_agree() -> None:
    from evaluation.aggregate import summarize
    from evaluation.judge import JudgeRecord

    records = [
        JudgeRecord("k0", "a", pf=8.0, sc=2.0, status={"PF": "ok", "SC": "ok"}),
        JudgeRecord("k1", "a", pf=None, sc=5.0, status={"PF": "failed", "SC": "ok"}),
        JudgeRecord("k2", "b", pf=6.0, sc=6.0, status={"PF": "ok", "SC": "ok"}),
    ]
    results = [SampleResult(r.key, "x", {**r.scores(), "dino": 0.5123}, r.task_type) for r in records]
    row = summarise("judged", results, skipped={"clip_i": "no weights"})
    judged = summarize(records)
    assert [row.metrics[k] for k in ("pf", "sc", "overall")] == pytest.approx([judged[m] for m in ("PF", "SC", "Overall")])
    assert row.coverage["pf"] == (2, 3) and row.coverage["overall"] == (2, 3)
    parsed = parse_markdown_table(format_markdown_table([row]))["judged"]
    # per task type first: PF (8 | 6), SC (3.5 | 6), Overall (sqrt(8 * 2) | 6)
    assert parsed == {"pf": 7.0, "sc": 4.75, "overall": 5.0, "dino": 0.512, "clip_i": None, "clip_t": None}


def test_summary_of_no_valid_values_is_missing_not_zero() -> None:
    s = summarise("empty", [SampleResult("k", "x", {"pf": None, "sc": None})])
    assert s.metrics["pf"] is None and s.metrics["overall"] is None
    assert f"| empty | {MISSING} |" in format_markdown_table([s])


def _with_targets(tmp_path: Path) -> list[SampleResult]:
    results = _results(tmp_path)
    for i, r in enumerate(results):
        r.target = save_image(Image.new("RGB", (64, 64), (250, 10 * i, 120)), tmp_path, f"{r.key}/target")
    return results


def test_target_round_trips_through_jsonl(tmp_path: Path) -> None:
    results = _with_targets(tmp_path)
    back = read_results_jsonl(write_results_jsonl(tmp_path / "samples.jsonl", results))
    assert [r.target for r in back] == [r.target for r in results] and back[0].target is not None
    assert read_results_jsonl(write_results_jsonl(tmp_path / "none.jsonl", _results(tmp_path)))[0].target is None


def test_html_puts_the_target_next_to_the_generated_image_at_the_same_display_size(tmp_path: Path) -> None:
    results = _with_targets(tmp_path)
    text = write_html(tmp_path / "report.html", results, display_size=240).read_text(encoding="utf-8")
    assert "image-rendering:pixelated" in text
    section = text.split('<section class="sample"')[1]
    figures = re.findall(r'<figure class="(\w+)"><img src="data:image/png;base64,([^"]+)" alt="[^"]*" '
                         r'width="(\d+)" height="(\d+)"', section)
    assert [f[0] for f in figures] == ["ref", "ref", "target", "gen"]
    sizes = {cls: (int(w), int(h)) for cls, _, w, h in figures}
    assert sizes["target"] == sizes["gen"] == (240, 240) and sizes["ref"] == (180, 180)
    target = Image.open(io.BytesIO(base64.b64decode(figures[2][1]))).convert("RGB")
    assert target.size == (64, 64) and target.getpixel((0, 0)) == (250, 0, 120)  # sample 0's own target, not resampled
    # data without a target (a manifest without one): no empty target box
    plain = write_html(tmp_path / "plain.html", _results(tmp_path)).read_text(encoding="utf-8")
    assert 'class="target"' not in plain


def test_sample_grid_is_the_training_grid_of_the_first_samples_with_an_image(tmp_path: Path) -> None:
    from cag.utils.images import grid_image

    results = _with_targets(tmp_path)
    results[0].generated = None  # not generated: left out, the next samples fill the grid
    path = write_sample_grid(tmp_path / "grid.png", results, num_samples=2)
    assert path is not None
    expected = grid_image(
        [[Image.open(tmp_path / p).convert("RGB") for p in r.references] for r in results[1:]],
        [Image.open(tmp_path / r.target).convert("RGB") for r in results[1:]],
        [Image.open(tmp_path / r.generated).convert("RGB") for r in results[1:]],
        64,
    )
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))
    for r in results:
        r.generated = None
    assert write_sample_grid(tmp_path / "none.png", results) is None
