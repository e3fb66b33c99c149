"""Another method's images: a folder of ``<key>.png`` matched to the test samples, checked and
brought to the evaluation's size, so every metric scores them as it scores our own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cag.data.batching import square
from cag.data.sample import Sample
from evaluation.target import EvaluationError

# file names accepted for an external image of sample <key>, in order of preference
EXTERNAL_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NORMALISED_DIR = "normalised"


@dataclass
class ExternalImages:
    """What was found in a folder of another method's images, per sample key.

    ``paths`` holds the image each metric scores (the file itself, or its normalised copy);
    ``missing`` and ``unreadable`` name the samples that are not scored at all; ``extra``
    lists files in the folder that match no sample key (a naming mistake shows up here).
    """

    folder: Path
    size: int | None
    paths: dict[str, str] = field(default_factory=dict)
    original_size: dict[str, tuple[int, int]] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    def problem(self, key: str) -> str | None:
        """Why sample ``key`` is not scored, or None when it is."""
        if key in self.unreadable:
            return f"unreadable: {self.unreadable[key]}"
        if key in self.missing:
            return "missing: no " + " / ".join(f"{key}{sfx}" for sfx in EXTERNAL_SUFFIXES) + f" in {self.folder}"
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "size_rule": f"centre-crop to square + bicubic resize to {self.size}" if self.size else "native size",
            "scored": len(self.paths),
            "missing": list(self.missing),
            "unreadable": dict(self.unreadable),
            "resized": len(self.resized),
            "extra_files": list(self.extra),
        }


def external_image_size(setting: Any, data_cfg: Mapping[str, Any]) -> int | None:
    """The size external images are scored at (None: their native size).

    ``auto`` means the synthetic benchmark's ``image_size`` (its proxies and our own
    generations are at that size, so every method is measured on the same pixel grid) and
    native size for manifest / shard test sets, whose size we do not know.
    """
    if setting is None or str(setting).lower() == "native":
        return None
    if str(setting).lower() == "auto":
        if data_cfg.get("source", "synthetic") == "synthetic":
            return int((data_cfg.get("synthetic") or {}).get("image_size", 128))
        return None
    try:
        size = int(setting)
    except (TypeError, ValueError):
        size = 0
    if isinstance(setting, bool) or size < 1:
        raise EvaluationError(f"image_size={setting!r} must be auto, native or a positive int")
    return size


def collect_external_images(
    samples: Sequence[Sample], folder: str | os.PathLike[str], out_dir: Path, size: int | None
) -> ExternalImages:
    """Match ``<key>.png`` (or .jpg/.jpeg/.webp) in ``folder`` to the samples; check and normalise each.

    The size rule: an image that is not ``size`` x ``size`` is centre-cropped to a square
    and resized with bicubic interpolation (:func:`cag.data.batching.square`, the
    platform's one resize policy), written as PNG to ``out_dir/normalised/<key>.png``, and
    every metric (judge included) scores that copy; an image already at ``size`` is scored
    as the file itself, byte for byte. ``size`` None scores every image at its native size.
    The folder is only read, never written.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise EvaluationError(f"images={folder} is not a folder (resolved to {root})")
    found = ExternalImages(folder=root, size=size)
    keys = {s.key for s in samples}
    for s in samples:
        path = next((root / f"{s.key}{sfx}" for sfx in EXTERNAL_SUFFIXES if (root / f"{s.key}{sfx}").is_file()), None)
        if path is None:
            found.missing.append(s.key)
            continue
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except Exception as exc:  # PIL raises many types for truncated or foreign files
            found.unreadable[s.key] = f"{path.name}: {type(exc).__name__}: {exc}"
            continue
        if image.width < 1 or image.height < 1:
            found.unreadable[s.key] = f"{path.name}: empty image {image.size}"
            continue
        found.original_size[s.key] = (image.width, image.height)
        if size is not None and image.size != (size, size):
            target = out_dir / NORMALISED_DIR / f"{s.key}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            square(image, size).save(target, format="PNG")
            found.paths[s.key] = str(target)
            found.resized.append(s.key)
        else:
            found.paths[s.key] = str(path)
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in EXTERNAL_SUFFIXES and p.stem not in keys:
            found.extra.append(p.name)
    return found
