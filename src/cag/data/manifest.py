"""A user's own data as a JSONL manifest, one sample a line.

Each line is a JSON object::

    {"key": "cafe-0001",                      # optional; default <manifest stem>-<line number>
     "references": ["imgs/rin.png", "imgs/xi.png", "imgs/cafe.png"],   # subjects first, scene last
     "target": "imgs/target.png",             # optional
     "instruction": "Medium shot. Rin (Fig.1) ...",
     "groundings": [{"phrase": "Rin (Fig.1)", "image_id": 1, "bbox_2d": [x1, y1, x2, y2]}],  # optional
     "task_type": "multi_character"}          # optional

Relative paths resolve against the manifest's folder, so a dataset folder can be moved
as a whole. Every problem is reported with the manifest path and line number, because
with thousands of lines "file not found" alone is useless.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cag.data.sample import Grounding, GroundingError, Sample, validate_grounding

KNOWN_FIELDS = {"key", "references", "target", "instruction", "groundings", "task_type"}


class ManifestError(ValueError):
    """A manifest line that cannot become a sample; the message names the manifest, the line and the culprit."""

    def __init__(self, manifest: Path, line: int, detail: str):
        super().__init__(f"{manifest}:{line}: {detail}")
        self.manifest, self.line, self.detail = manifest, line, detail


@dataclass
class ManifestEntry:
    """One checked manifest line; images are opened only by :meth:`to_sample`, so a big manifest checks fast."""

    manifest: Path
    line: int
    key: str
    references: list[Path]
    instruction: str
    target: Path | None = None
    groundings: list[Grounding] = field(default_factory=list)
    task_type: str = "multi_character"

    def _open(self, path: Path, what: str) -> Image.Image:
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except FileNotFoundError as exc:
            raise ManifestError(self.manifest, self.line, f"{what} file not found: {path}") from exc
        except Exception as exc:  # PIL raises many types for broken files
            raise ManifestError(self.manifest, self.line, f"{what} {path} is not a readable image: {exc}") from exc

    def to_sample(self) -> Sample:
        refs = [self._open(p, f"references[{i}]") for i, p in enumerate(self.references)]
        target = self._open(self.target, "target") if self.target is not None else None
        return Sample(
            key=self.key,
            references=refs,
            instruction=self.instruction,
            groundings=list(self.groundings),
            target=target,
            task_type=self.task_type,
            truth=None,
        )


def _default_key_prefix(manifest: Path) -> str:
    stem = manifest.name.split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "manifest"


def parse_line(manifest: Path, line_no: int, text: str, *, check_files: bool = True) -> ManifestEntry:
    """Check one line's JSON, fields, files and groundings; raise :class:`ManifestError` on the first problem."""

    def fail(detail: str) -> ManifestError:
        return ManifestError(manifest, line_no, detail)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; allowed: {sorted(KNOWN_FIELDS)}")
    if not isinstance(obj.get("instruction"), str) or not obj["instruction"].strip():
        raise fail(f"key 'instruction' must be a non-empty string, got {obj.get('instruction')!r}")
    refs = obj.get("references")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
        raise fail(f"key 'references' must be a non-empty list of image paths, got {refs!r}")
    base = manifest.parent

    def resolve(rel: str, what: str) -> Path:
        path = (base / rel) if not Path(rel).is_absolute() else Path(rel)
        if check_files and not path.is_file():
            raise fail(f"{what} file not found: {rel!r} (resolved to {path})")
        return path

    references = [resolve(r, f"references[{i}]") for i, r in enumerate(refs)]
    target = None
    if obj.get("target") is not None:
        if not isinstance(obj["target"], str) or not obj["target"]:
            raise fail(f"key 'target' must be an image path, got {obj['target']!r}")
        target = resolve(obj["target"], "target")
    key = obj.get("key", f"{_default_key_prefix(manifest)}-{line_no:06d}")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise fail(f"key 'key'={key!r} must be a non-empty string without dots or slashes "
                   "(WebDataset splits member names at the first dot)")
    task_type = obj.get("task_type", "multi_character")
    if not isinstance(task_type, str) or not task_type:
        raise fail(f"key 'task_type' must be a non-empty string, got {task_type!r}")
    raw = obj.get("groundings", [])
    if not isinstance(raw, list):
        raise fail(f"key 'groundings' must be a list, got {type(raw).__name__}")
    groundings = []
    for j, g_obj in enumerate(raw):
        try:
            if not isinstance(g_obj, dict):
                raise GroundingError(f"{g_obj!r} is not an object")
            g = Grounding.from_json(g_obj)
            validate_grounding(g, len(references), obj["instruction"])
        except GroundingError as exc:
            raise fail(f"groundings[{j}]: {exc}") from exc
        groundings.append(g)
    return ManifestEntry(manifest, line_no, key, references, obj["instruction"], target, groundings, task_type)


def scan_manifest(path: str | Path, *, check_files: bool = True) -> Iterator[ManifestEntry | ManifestError]:
    """Every non-blank line as an entry or as the error that explains it, for callers that skip bad lines."""
    manifest = Path(path)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    seen: dict[str, int] = {}
    with manifest.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                entry = parse_line(manifest, line_no, text, check_files=check_files)
                if entry.key in seen:
                    raise ManifestError(manifest, line_no, f"key {entry.key!r} already used on line {seen[entry.key]}")
            except ManifestError as exc:
                yield exc
                continue
            seen[entry.key] = line_no
            yield entry


def load_manifest(path: str | Path, *, check_files: bool = True) -> list[ManifestEntry]:
    """All entries, or one :class:`ManifestError` listing every bad line (up to 20), before anything is written."""
    entries, errors = [], []
    for item in scan_manifest(path, check_files=check_files):
        (errors if isinstance(item, ManifestError) else entries).append(item)
    if errors:
        first = errors[0]
        if len(errors) == 1:
            raise first
        listed = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ManifestError(first.manifest, first.line, f"{len(errors)} bad lines:\n  {listed}{more}")
    return entries


def read_manifest(path: str | Path) -> Iterator[Sample]:
    """Samples of a manifest, checked as a whole first so a bad line fails before anything is written or trained.

    Raises :class:`ManifestError` (file and line) for a bad line or an unreadable image.
    """
    for entry in load_manifest(path):
        yield entry.to_sample()

