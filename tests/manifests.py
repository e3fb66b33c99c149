"""Test support: write samples as a training manifest (JSONL + PNG files), the format cag.data.manifest reads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cag.data.sample import Sample


def write_training_manifest(samples: Iterable[Sample], root: Path) -> Path:
    """Every sample's references and target as PNG files under ``root/imgs``; returns the JSONL path."""
    lines = []
    for s in samples:
        refs = []
        for k, ref in enumerate(s.references):
            path = root / "imgs" / f"{s.key}-ref{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            ref.save(path)
            refs.append(str(path))
        target = root / "imgs" / f"{s.key}-target.png"
        s.target.save(target)
        lines.append(json.dumps({"key": s.key, "references": refs, "target": str(target), "instruction": s.instruction,
                                 "groundings": [g.to_json() for g in s.groundings], "task_type": s.task_type}))
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
