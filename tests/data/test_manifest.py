"""JSONL manifests: paths resolve against the manifest, and every problem names the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cag.data.manifest import ManifestError, load_manifest, read_manifest, scan_manifest
from cag.data.sample import Grounding


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "my.data"
    _image(root / "imgs" / "rin.png", (200, 30, 30))
    _image(root / "imgs" / "park.png", (30, 200, 30), (50, 50))
    _image(root / "imgs" / "target.png", (30, 30, 200), (64, 64))
    return root


GOOD = {
    "references": ["imgs/rin.png", "imgs/park.png"],
    "target": "imgs/target.png",
    "instruction": "Medium shot. Rin (Fig.1) waves in the park (Fig.2).",
    "groundings": [
        {"phrase": "Rin (Fig.1)", "image_id": 1, "bbox_2d": [100, 50, 900, 1000]},
        {"phrase": "the park (Fig.2)", "image_id": 2, "bbox_2d": [0, 0, 1000, 1000]},
    ],
    "task_type": "scene_single_character",
}


def test_relative_paths_resolve_against_the_manifest_folder(dataset, monkeypatch, tmp_path):
    manifest = _write(dataset / "train.v1.jsonl", ["", GOOD, {**GOOD, "key": "own-key", "target": None}])
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    samples = list(read_manifest(manifest))
    assert [s.key for s in samples] == ["train-000002", "own-key"]
    s = samples[0]
    assert s.instruction == GOOD["instruction"] and s.task_type == "scene_single_character"
    assert s.groundings == [Grounding("Rin (Fig.1)", 1, (100.0, 50.0, 900.0, 1000.0)),
                            Grounding("the park (Fig.2)", 2, (0.0, 0.0, 1000.0, 1000.0))]
    assert [r.size for r in s.references] == [(40, 30), (50, 50)]
    assert tuple(np.asarray(s.references[0])[0, 0]) == (200, 30, 30)
    assert s.target is not None and s.target.size == (64, 64)
    assert samples[1].target is None and samples[1].truth is None


def test_absolute_paths_are_used_as_given(dataset, tmp_path):
    line = {**GOOD, "references": [str(dataset / "imgs" / "rin.png"), str(dataset / "imgs" / "park.png")],
            "target": None}
    manifest = _write(tmp_path / "elsewhere.jsonl", [line])
    (entry,) = load_manifest(manifest)
    assert entry.references[0] == dataset / "imgs" / "rin.png"


def test_missing_file_error_names_the_file_and_the_line(dataset):
    bad = {**GOOD, "references": ["imgs/rin.png", "imgs/nowhere.png"]}
    manifest = _write(dataset / "m.jsonl", [GOOD, "", bad])
    with pytest.raises(ManifestError) as err:
        list(read_manifest(manifest))
    msg = str(err.value)
    assert f"{manifest}:3:" in msg and "imgs/nowhere.png" in msg and "references[1]" in msg
    assert err.value.line == 3


def test_missing_target_names_the_target(dataset):
    manifest = _write(dataset / "m.jsonl", [{**GOOD, "target": "imgs/gone.png"}])
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: target file not found: 'imgs/gone\.png'"):
        load_manifest(manifest)


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"groundings": [{"phrase": "Rin (Fig.1)", "image_id": 3, "bbox_2d": [0, 0, 10, 10]}]}, "image_id=3"),
        ({"groundings": [{"phrase": "Rin (Fig.1)", "image_id": 1, "bbox_2d": [0, 0, 1010, 10]}]}, "x2=1010"),
        ({"groundings": [{"phrase": "Kai (Fig.1)", "image_id": 1, "bbox_2d": [0, 0, 10, 10]}]}, "'Kai (Fig.1)'"),
        ({"groundings": [{"phrase": "Rin (Fig.1)", "image_id": 1}]}, "bbox_2d"),
        ({"instruction": ""}, "'instruction'"),
        ({"references": []}, "'references'"),
        ({"key": "has.dot"}, "has.dot"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_line_error_names_the_line_and_the_culprit(dataset, change, culprit):
    manifest = _write(dataset / "m.jsonl", [GOOD, {**GOOD, **change}])
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    assert f"{manifest}:2:" in str(err.value) and culprit in str(err.value)


def test_invalid_json_and_duplicate_keys_are_reported_per_line(dataset):
    manifest = _write(dataset / "m.jsonl", [{**GOOD, "key": "a"}, "{oops", {**GOOD, "key": "a"}])
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    msg = str(err.value)
    assert "2 bad lines" in msg
    assert f"{manifest}:2: not valid JSON" in msg
    assert f"{manifest}:3: key 'a' already used on line 1" in msg


def test_scan_yields_good_entries_and_errors_for_lenient_callers(dataset):
    manifest = _write(dataset / "m.jsonl", [GOOD, {**GOOD, "target": "imgs/gone.png"}, GOOD])
    items = list(scan_manifest(manifest))
    assert [type(i).__name__ for i in items] == ["ManifestEntry", "ManifestError", "ManifestEntry"]
    assert items[1].line == 2


def test_unreadable_image_names_the_file_and_the_line(dataset):
    (dataset / "imgs" / "broken.png").write_bytes(b"not an image at all")
    manifest = _write(dataset / "m.jsonl", [GOOD, {**GOOD, "references": ["imgs/broken.png", "imgs/park.png"]}])
    samples = read_manifest(manifest)
    next(samples)
    with pytest.raises(ManifestError) as err:
        next(samples)
    assert f"{manifest}:2:" in str(err.value) and "broken.png" in str(err.value)


def test_missing_manifest_is_reported_by_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_manifest(tmp_path / "nope.jsonl")
