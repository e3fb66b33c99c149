"""src/make_data.py (cag.make_data): the Hydra app writes shards plus a summary, refuses to mix runs, and reports bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from cag import make_data
from cag.data.shards import iter_shard_samples

ROOT = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "make_data.py"), f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false",
         *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )


def _cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "make_data.yaml")
    cfg.pop("defaults")
    cfg.progress = False
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_cli_writes_synthetic_shards_and_a_summary(tmp_path):
    out = tmp_path / "shards" / "val" / "shard-%06d.tar"
    proc = _cli(tmp_path, "split=val", "num_samples=7", "maxcount=3", "image_size=64", "num_characters=[1,3]",
                f"out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 7 samples into 3 shard(s)" in proc.stdout and "rejected 0 sample(s)" in proc.stdout
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["written"] == 7 and summary["rejected"] == 0 and summary["num_shards"] == 3
    assert summary["synthetic"] == {"image_size": 64, "seed": 0, "num_characters": [1, 3], "place": "text", "shot": "text",
                                    "describe_colours": True, "ground_places": False, "train_roster": "fixed"}
    samples = list(iter_shard_samples(summary["urls"]))
    assert [s.key for s in samples] == [f"val-{i:06d}" for i in range(7)]
    assert all(s.references[0].size == (64, 64) for s in samples)


def test_cli_default_output_lands_under_data_shards_split(tmp_path):
    proc = _cli(tmp_path, "split=test", "num_samples=2", "image_size=64")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "shards" / "test" / "shard-000000.tar").is_file()
    assert (tmp_path / "data" / "shards" / "test" / "summary.json").is_file()


def test_cli_manifest_with_missing_file_fails_naming_file_and_line(tmp_path):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"references": ["a.png"], "instruction": "Rin (Fig.1)."}) + "\n"
        + json.dumps({"references": ["a.png", "gone.png"], "instruction": "Rin (Fig.1)."}) + "\n"
    )
    proc = _cli(tmp_path, "source=manifest", f"manifest={manifest}", f"out={tmp_path / 'o' / 's-%06d.tar'}")
    assert proc.returncode == 2
    assert f"{manifest}:2:" in proc.stderr and "gone.png" in proc.stderr
    assert not (tmp_path / "o" / "s-000000.tar").exists()


def test_existing_shards_are_kept_unless_overwrite_is_set(tmp_path):
    out = str(tmp_path / "s" / "shard-%06d.tar")
    make_data.run(_cfg(num_samples=4, maxcount=2, image_size=64, out=out))
    with pytest.raises(make_data.MakeDataError, match="overwrite=true"):
        make_data.run(_cfg(num_samples=1, image_size=64, out=out))
    summary = make_data.run(_cfg(num_samples=1, image_size=64, out=out, overwrite=True))
    assert summary.written == 1
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == ["shard-000000.tar"]


def test_lenient_manifest_skips_bad_lines_and_lists_them_in_the_summary(tmp_path):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"no image")
    lines = [
        {"references": ["a.png"], "instruction": "Rin (Fig.1) waves."},
        {"references": ["gone.png"], "instruction": "Rin (Fig.1) waves."},
        {"references": ["broken.png"], "instruction": "Rin (Fig.1) waves."},
        {"references": ["a.png"], "instruction": "Rin (Fig.1) waves.",
         "groundings": [{"phrase": "Rin (Fig.1)", "image_id": 2, "bbox_2d": [0, 0, 5, 5]}]},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o" / "s-%06d.tar"
    summary = make_data.run(_cfg(source="manifest", manifest=str(manifest), strict=False, out=str(out)))
    assert summary.written == 1
    report = json.loads((out.parent / "summary.json").read_text())
    reasons = {r["key"]: r["reason"] for r in report["rejected_samples"]}
    assert set(reasons) == {"line 2", "m-000003", "line 4"}
    assert "gone.png" in reasons["line 2"] and "broken.png" in reasons["m-000003"] and "image_id=2" in reasons["line 4"]
    assert report["rejected_by_reason"] == {"bad_manifest_line": 2, "unreadable_image": 1}


def test_bad_synthetic_settings_are_refused_by_name(tmp_path):
    with pytest.raises(make_data.MakeDataError, match="split='dev'"):
        make_data.run(_cfg(split="dev", out=str(tmp_path / "x-%06d.tar")))
    with pytest.raises(make_data.MakeDataError, match="image_size"):
        make_data.run(_cfg(image_size=16, out=str(tmp_path / "x-%06d.tar")))
    with pytest.raises(make_data.MakeDataError, match="source='s3'"):
        make_data.run(_cfg(source="s3", out=str(tmp_path / "x-%06d.tar")))
